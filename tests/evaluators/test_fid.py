"""FID/sFID/IS/precision-recall against pytorch-fid and plain transcriptions of the definitions.

The Inception-based check uses a random-weight (He-initialised) Flax Inception on 80 px images,
so it needs no weights: FID and sFID must grow as Gaussian pixel noise of increasing std is added.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_reference

from biflow_jax.evaluators.fid import (
    ReferenceBatch,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    read_reference_batch,
    score,
    write_reference_batch,
)
from biflow_jax.models.inception import InceptionV3, parameter_shapes, scale_for_inception


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / math.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix + shift).astype(np.float32)


def test_statistics_match_numpy():
    x = _features(300, 12, 0)
    mu, sigma = feature_statistics(x, chunk=64)
    x64 = x.astype(np.float64)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-12)


def test_fid_matches_pytorch_fid():
    torch_reference.torchvision()
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    a, b = _features(400, 32, 1), _features(300, 32, 2, shift=0.3)
    stats_a, stats_b = feature_statistics(a), feature_statistics(b)
    ours = frechet_distance(*stats_a, *stats_b)
    ref = fid_score.calculate_frechet_distance(*stats_a, *stats_b)
    assert ours > 0.1
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_fid_against_own_statistics_is_zero():
    x = _features(500, 24, 3)
    mu, sigma = feature_statistics(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def _naive_inception_score(logits: np.ndarray, parts: list[tuple[int, int]]) -> float:
    scores = []
    for start, stop in parts:
        probs = []
        for row in logits[start:stop]:
            exps = [math.exp(v) for v in row]
            probs.append([e / sum(exps) for e in exps])
        marginal = [sum(p[c] for p in probs) / len(probs) for c in range(logits.shape[1])]
        kls = [sum(p[c] * (math.log(p[c]) - math.log(marginal[c])) for c in range(len(marginal))) for p in probs]
        scores.append(math.exp(sum(kls) / len(kls)))
    return sum(scores) / len(scores)


def test_inception_score_matches_definition():
    logits = np.random.default_rng(4).normal(scale=3.0, size=(25, 7))
    # ADM: consecutive splits of split_size rows, the short last one included.
    assert inception_score(logits, split_size=10) == pytest.approx(
        _naive_inception_score(logits, [(0, 10), (10, 20), (20, 25)]), rel=1e-12)
    # Salimans et al.: num_splits parts with boundaries i * N // splits.
    assert inception_score(logits, num_splits=4) == pytest.approx(
        _naive_inception_score(logits, [(i * 25 // 4, (i + 1) * 25 // 4) for i in range(4)]), rel=1e-12)
    # Identical confident predictions: IS = 1; uniform over classes by sample: IS = classes.
    assert inception_score(np.tile([50.0, 0, 0], (6, 1))) == pytest.approx(1.0)
    assert inception_score(np.eye(3)[np.arange(6) % 3] * 50.0) == pytest.approx(3.0, rel=1e-9)


def _naive_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radius(points, i):  # distance to the k-th nearest *other* point
        return sorted(math.dist(points[i], points[j]) for j in range(len(points)) if j != i)[k - 1]

    real_r = [radius(real, i) for i in range(len(real))]
    fake_r = [radius(fake, i) for i in range(len(fake))]
    precision = sum(any(math.dist(f, r) <= real_r[j] for j, r in enumerate(real)) for f in fake) / len(fake)
    recall = sum(any(math.dist(r, f) <= fake_r[j] for j, f in enumerate(fake)) for r in real) / len(real)
    return precision, recall


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_match_definition(k):
    real = _features(40, 5, 5)
    fake = _features(30, 5, 6, shift=0.5) * 1.5
    ours = precision_recall(real, fake, k=k, batch_size=7)
    ref = _naive_precision_recall(real.astype(np.float64), fake.astype(np.float64), k)
    assert ours == pytest.approx(ref, abs=1e-12)
    assert 0.0 < ours[0] < 1.0 and 0.0 < ours[1] < 1.0  # the check is not vacuous


def test_reference_batch_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    stats = feature_statistics(_features(20, 6, 8)) + feature_statistics(_features(20, 5, 9))
    path = tmp_path / "ref_batch"  # no .npz suffix: kept as given
    write_reference_batch(path, *stats, images=images)
    batch = read_reference_batch(path)
    for name, want in zip(("mu", "sigma", "mu_s", "sigma_s"), stats):
        np.testing.assert_array_equal(getattr(batch, name), want)
    np.testing.assert_array_equal(batch.images, images)
    assert batch.images.dtype == np.uint8
    assert sorted(np.load(path).files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    assert read_reference_batch(path, load_images=False).images is None
    np.savez(tmp_path / "bad.npz", arr_0=images, mu=stats[0])
    with pytest.raises(ValueError, match="sigma"):
        read_reference_batch(tmp_path / "bad.npz")


def _random_inception_variables(seed: int) -> dict:
    """He-initialised weights, identity BatchNorm: features stay O(1) through the depth."""
    rng = np.random.default_rng(seed)
    variables: dict = {}
    for collection, shapes in parameter_shapes().items():
        for path, shape in shapes.items():
            leaf = path.split("/")[-1]
            if leaf == "kernel":
                value = rng.normal(size=shape) * math.sqrt(2.0 / math.prod(shape[:-1]))
            elif leaf in ("scale", "var"):
                value = np.ones(shape)
            else:
                value = np.zeros(shape)
            node = variables.setdefault(collection, {})
            for name in path.split("/")[:-1]:
                node = node.setdefault(name, {})
            node[leaf] = jnp.asarray(value, jnp.float32)
    return variables


def _smooth_images(n: int, seed: int) -> np.ndarray:
    """Random low-frequency colour fields in [0, 255] (8x8 noise upsampled to 80x80)."""
    coarse = np.random.default_rng(seed).uniform(0, 255, (n, 8, 8, 3)).astype(np.float32)
    return np.asarray(jax.image.resize(coarse, (n, 80, 80, 3), "bilinear"))


def _fid_in_joint_span(a: np.ndarray, b: np.ndarray) -> float:
    """The FID of (N, 2048) feature sets with N << 2048, computed in the span of the data.

    An orthonormal basis Q holding every centred feature and the mean difference leaves
    |mu1 - mu2|^2, Tr S and Tr (S1 S2)^(1/2) unchanged (S = Q A Q^T), so this is the 2048-D
    FID to rounding, at the cost of a (2N+1)-D instead of a 2048-D ``sqrtm`` (~a minute here).
    """
    a, b = a.astype(np.float64), b.astype(np.float64)
    span = np.concatenate([a - a.mean(0), b - b.mean(0), (a.mean(0) - b.mean(0))[None]])
    q = np.linalg.qr(span.T)[0]
    return frechet_distance(*feature_statistics(a @ q), *feature_statistics(b @ q))


def test_fid_grows_with_noise_random_inception():
    variables = _random_inception_variables(0)
    forward = jax.jit(lambda v, x: InceptionV3().apply(v, scale_for_inception(x)))  # weights as an argument

    def features(images):
        out = forward(variables, jnp.asarray(images))
        return np.asarray(out.pool), np.asarray(out.spatial)

    n = 40
    real_pool, real_spatial = features(_smooth_images(n, 1))
    real_spatial_stats = feature_statistics(real_spatial)  # 3 x 3 x 7 = 63 features at 80 px
    clean = _smooth_images(n, 2)
    noise = np.random.default_rng(3).normal(size=clean.shape).astype(np.float32)
    fids, sfids = [], []
    for std in (0.0, 8.0, 24.0, 64.0):
        pool, spatial = features(np.clip(clean + std * noise, 0, 255))
        fids.append(_fid_in_joint_span(pool, real_pool))
        sfids.append(frechet_distance(*feature_statistics(spatial), *real_spatial_stats))
    assert all(b > a for a, b in itertools.pairwise(fids)), fids
    assert all(b > a for a, b in itertools.pairwise(sfids)), sfids
    assert fids[-1] > 2 * fids[0], fids


def test_score_report(tmp_path):
    """score() on an ADM-style reference file: the five numbers, each from its own function."""
    real, fake = _features(60, 16, 10), _features(50, 16, 11, shift=0.2)
    real_s, fake_s = _features(60, 9, 12), _features(50, 9, 13)
    logits = np.random.default_rng(14).normal(size=(50, 1008))
    path = tmp_path / "ref.npz"
    write_reference_batch(path, *feature_statistics(real), *feature_statistics(real_s))
    reference = read_reference_batch(path)
    samples = {"pool": fake, "spatial": fake_s, "is_logits": logits}
    with pytest.raises(ValueError, match="reference.pool"):
        score(samples, reference)
    reference.pool = real
    result = score(samples, reference, split_size=20)
    assert result == pytest.approx({
        "fid": frechet_distance(*feature_statistics(fake), *feature_statistics(real)),
        "sfid": frechet_distance(*feature_statistics(fake_s), *feature_statistics(real_s)),
        "inception_score": inception_score(logits, split_size=20),
        "precision": precision_recall(real, fake)[0],
        "recall": precision_recall(real, fake)[1],
    }, rel=1e-12)
    no_pr = score(samples, ReferenceBatch(*feature_statistics(real), *feature_statistics(real_s)),
                  with_precision_recall=False)
    assert np.isnan(no_pr["precision"]) and np.isnan(no_pr["recall"])

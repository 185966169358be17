"""Exact-inverse sampling: round trips, solver agreement, the guidance rules, denoising, the sample mode.

Tiny flows (8x8x1 images, patch 2: 16 tokens of 4 dims) with proj_out perturbed away
from its zero init, so (a, b) depend on the context and the solvers do real work.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from biflow_jax.models.tarflow import TARFlow, patchify
from biflow_jax.modes import sample as sample_mode
from biflow_jax.samplers import exact_inverse

NUM_CLASSES = 10
PROJ_OUT_SCALE = 0.03  # (a, b) vary visibly with the context; 0.05 makes sampling overflow


def random_param(path: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A value for one parameter; proj_out is nonzero and class embeddings differ visibly."""
    if path.endswith("norm/scale"):
        return np.ones(shape)
    if path.endswith("norm/bias"):
        return np.zeros(shape)
    if path.endswith("proj_out/kernel"):
        return PROJ_OUT_SCALE * rng.standard_normal(shape)
    if path.endswith("kernel"):
        return rng.standard_normal(shape) / np.sqrt(shape[0])
    if path.endswith("class_embed"):
        return 0.5 * rng.standard_normal(shape)
    return 0.02 * rng.standard_normal(shape)  # biases, pos_embed


def make_flow(num_blocks: int, num_classes: int = NUM_CLASSES, seed: int = 0, dtype=jnp.float32):
    """A tiny flow with random parameters drawn in numpy: compiling model.init costs seconds on CPU."""
    model = TARFlow(img_size=8, in_channels=1, patch_size=2, channels=64, num_blocks=num_blocks,
                    layers_per_block=1, num_classes=num_classes, dtype=dtype)
    y = jnp.zeros((1,), jnp.int32) if num_classes else None
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), y)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(random_param("/".join(k.key for k in path), leaf.shape, rng), leaf.dtype),
        shapes)
    assert {"proj_out", "proj_in", "pos_embed"} <= set(params["params"]["blocks_0"])
    return model, params


@pytest.fixture(scope="module")
def flow():
    return make_flow(num_blocks=2)


@pytest.fixture(scope="module")
def one_block_flow():
    return make_flow(num_blocks=1, seed=3)


@pytest.fixture(scope="module")
def batch():
    rng = jax.random.PRNGKey(42)
    x = jax.random.uniform(rng, (4, 8, 8, 1), minval=-1.0, maxval=1.0)
    z = jax.random.normal(jax.random.fold_in(rng, 1), (4, 16, 4))
    y = jnp.array([0, 3, 9, -1], jnp.int32)
    return x, z, y


def test_cached_inverse_round_trips_both_ways(flow, batch):
    model, params = flow
    x, z, y = batch
    # x -> F(x) -> F^-1: the images come back (float32, tolerance 1e-4).
    recovered = exact_inverse.inverse_cached(model, params, exact_inverse.encode(model, params, x, y), y)
    np.testing.assert_allclose(exact_inverse.tokens_to_images(model, recovered), x, atol=1e-4)
    # z -> F^-1(z) -> F: the noise comes back.
    generated = exact_inverse.tokens_to_images(model, exact_inverse.inverse_cached(model, params, z, y))
    np.testing.assert_allclose(exact_inverse.encode(model, params, generated, y), z, atol=1e-4)
    # The perturbed flow is far from the identity, so the round trip is not vacuous.
    assert float(jnp.max(jnp.abs(patchify(generated, 2) - z))) > 0.05


def test_cached_equals_naive(flow, batch):
    model, params = flow
    _, z, y = batch
    cached = exact_inverse.inverse_cached(model, params, z, y)
    naive = exact_inverse.inverse_naive(model, params, z, y)
    np.testing.assert_allclose(cached, naive, atol=1e-5)


def test_jacobi_at_convergence_equals_cached(flow, batch):
    model, params = flow
    _, z, y = batch
    cached = exact_inverse.inverse_cached(model, params, z, y)
    # tol 0 runs to the exact fixed point: at most T = 16 iterations per block.
    exact, iters = exact_inverse.inverse_jacobi(model, params, z, y, tol=0.0)
    np.testing.assert_allclose(exact, cached, atol=1e-5)
    assert iters.shape == (2,) and np.all(np.asarray(iters) <= model.num_tokens)
    assert np.all(np.asarray(iters) > 2)  # a context-dependent flow needs real iterations
    approx, approx_iters = exact_inverse.inverse_jacobi(model, params, z, y, tol=1e-3)
    np.testing.assert_allclose(approx, cached, atol=1e-2)
    assert np.all(np.asarray(approx_iters) <= np.asarray(iters))


def test_zero_guidance_equals_plain_sampling(flow, batch):
    model, params = flow
    _, z, y = batch
    plain = exact_inverse.inverse_cached(model, params, z, y)
    zero = exact_inverse.Guidance(scale=0.0, what="a", annealed=True, attn_temp=0.5, rule="starflow")
    np.testing.assert_allclose(exact_inverse.inverse_cached(model, params, z, y, zero), plain, atol=1e-6)


def expected_guided_ab(a_c, b_c, a_u, b_u, guidance, num_tokens):
    """TARFlow's guidance rules (arXiv:2412.06329, docs/tarflow.md) in numpy, per token position."""
    a_c, b_c, a_u, b_u = (np.asarray(v, np.float64) for v in (a_c, b_c, a_u, b_u))
    positions = np.arange(num_tokens)[None, :, None]
    g = positions / (num_tokens - 1) * guidance.scale if guidance.annealed else guidance.scale
    if guidance.rule == "cfg":
        a, b = a_c + g * (a_c - a_u), b_c + g * (b_c - b_u)
    else:
        sigma_c, sigma_u = np.exp(a_c), np.exp(a_u)
        s = np.minimum(sigma_c / sigma_u, 1.0) ** 2
        a = np.log(sigma_c / np.sqrt(1 + g - g * s))
        b = ((1 + g) * b_c - g * s * b_u) / (1 + g - g * s)
    return (a if "a" in guidance.what else a_c), (b if "b" in guidance.what else b_c)


GUIDANCE_CASES = [
    exact_inverse.Guidance(scale=1.5, what="ab", annealed=True, attn_temp=0.7, rule="cfg"),
    exact_inverse.Guidance(scale=2.0, what="a", rule="cfg"),
    exact_inverse.Guidance(scale=1.5, what="ab", annealed=True, attn_temp=1.3, rule="starflow"),
]


@pytest.mark.parametrize("guidance", GUIDANCE_CASES, ids=["cfg-annealed-temp", "cfg-a", "starflow"])
def test_guided_inverse_follows_the_guidance_rule(one_block_flow, batch, guidance):
    model, params = one_block_flow
    _, z, y = batch
    x = np.asarray(exact_inverse.inverse_cached(model, params, z, y, guidance))
    # The branches evaluated directly on the final sequence (block 0 keeps raster order).
    transform = jax.jit(functools.partial(model.apply, method=TARFlow.block_transform), static_argnums=1)
    a_c, b_c, _ = transform(params, 0, x, y, 1.0)
    a_u, b_u, _ = transform(params, 0, x, jnp.full_like(y, -1), guidance.attn_temp)
    a, b = expected_guided_ab(a_c, b_c, a_u, b_u, guidance, model.num_tokens)
    np.testing.assert_allclose(x, np.asarray(z) * np.exp(a) + b, atol=2e-5)
    # The guided result differs from the unguided one: guidance did something.
    assert np.max(np.abs(x - np.asarray(exact_inverse.inverse_cached(model, params, z, y)))) > 1e-2
    if guidance.rule == "starflow":
        naive = exact_inverse.inverse_naive(model, params, z, y, guidance)
        jacobi, _ = exact_inverse.inverse_jacobi(model, params, z, y, guidance, tol=0.0)
        np.testing.assert_allclose(naive, x, atol=1e-5)
        np.testing.assert_allclose(jacobi, x, atol=1e-5)


def test_denoise_is_a_score_step_checked_by_finite_differences(batch):
    with jax.enable_x64(True):  # restored on exit: no float64 leaks into other tests
        model, params = make_flow(num_blocks=2, seed=5, dtype=jnp.float64)
        x, _, y = batch
        x, y = jnp.asarray(x[:2], jnp.float64) * 0.5, y[:2]
        sigma = 0.3
        step = (exact_inverse.denoise(model, params, x, y, sigma) - x) / sigma**2

        # A float64 flow gives a sharp check; if the model pins float32 internally, the
        # central difference needs a larger step and a looser tolerance.
        logp_shape = jax.eval_shape(functools.partial(exact_inverse.log_likelihood, model), params, x, y)
        precise = logp_shape.dtype == jnp.float64
        h, tol = (1e-4, 1e-6) if precise else (1e-2, 5e-3)
        dims = math.prod(x.shape[1:])
        basis = jnp.eye(dims, dtype=x.dtype).reshape(dims, *x.shape[1:])

        @jax.jit
        def central_difference(x):
            signs = jnp.array([h, -h], x.dtype).reshape(2, 1, 1, 1, 1, 1)
            shifted = x[None, :, None] + signs * basis[None, None]  # (+h / -h, N, dims, 8, 8, 1)
            labels = jnp.tile(jnp.repeat(y, dims), 2)
            logp = exact_inverse.log_likelihood(model, params, shifted.reshape(-1, *x.shape[1:]), labels)
            logp = logp.reshape(2, len(x), dims)
            return ((logp[0] - logp[1]) / (2 * h)).reshape(x.shape)

        np.testing.assert_allclose(step, central_difference(x), atol=tol)
        # The log-det term matters at this tolerance: leaving out the factor dims would fail.
        logdet_grad = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(params, v, y).logdets)))(x)
        assert float(jnp.max(jnp.abs((dims - 1) * logdet_grad))) > 10 * tol
    assert jnp.ones(1).dtype == jnp.float32


def test_bad_labels_and_guidance_are_rejected(flow, batch):
    model, params = flow
    _, z, _ = batch
    with pytest.raises(ValueError, match=r"label 10 .*K=10"):
        exact_inverse.inverse_cached(model, params, z, jnp.array([0, 1, 10, 2]))
    with pytest.raises(ValueError, match=r"label -3 .*K=10"):
        exact_inverse.sample(model, params, jax.random.PRNGKey(0), labels=[-3, 1])
    unconditional, uparams = make_flow(num_blocks=1, num_classes=0)
    with pytest.raises(ValueError, match="unconditional model"):
        exact_inverse.inverse_cached(unconditional, uparams, z, None, exact_inverse.Guidance(scale=1.0))
    with pytest.raises(ValueError, match=r"label 0 .*K=0"):
        exact_inverse.inverse_cached(unconditional, uparams, z, jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="rule"):
        exact_inverse.Guidance(scale=1.0, rule="bogus")
    with pytest.raises(ValueError, match="labels=None on a class-conditional model"):  # a silent no-op before
        exact_inverse.inverse_cached(model, params, z, None, exact_inverse.Guidance(scale=1.0))


def install_fake_load_flow(monkeypatch, load_flow):
    """Point `biflow_jax.runs.load_flow` at a stand-in."""
    from biflow_jax import runs

    monkeypatch.setattr(runs, "load_flow", load_flow)


def test_run_sample_writes_grid_and_npz(one_block_flow, tmp_path, monkeypatch):
    model, params = one_block_flow
    config = ml_collections.ConfigDict({
        "train": {"noise": "gaussian", "noise_std": 0.05},
        "sample": {"num_images": 12, "batch_size": 5, "denoise": True},  # the last batch of 2 is padded to 5
    })
    calls = []

    def fake_load_flow(workdir, ema=True):
        from biflow_jax.runs import FlowRun

        calls.append((workdir, ema))
        return FlowRun(workdir, config, model, params, 0)

    install_fake_load_flow(monkeypatch, fake_load_flow)
    result = sample_mode.run_sample(str(tmp_path), num_images=None, ema=False, config=config)
    assert calls == [(str(tmp_path), False)]
    assert result["num_images"] == 12 and result["denoise_sigma"] == pytest.approx(0.05)

    folder = tmp_path / "samples" / "exact_w0_seed0_n12"  # a new folder named after the settings
    saved = np.load(folder / "samples.npz")
    assert saved["images"].shape == (12, 8, 8, 1) and saved["images"].dtype == np.uint8
    np.testing.assert_array_equal(saved["labels"], np.arange(12) % NUM_CLASSES)
    assert saved["images"].std() > 0
    # One row per class (10 rows), as many columns as the most frequent class (2), 2px padding;
    # 8x8 images are enlarged 4x (to at least 32 px) so a person can see them, under a caption
    # band of whole text lines (tests/modes/test_sample.py checks the grid's content).
    with Image.open(folder / "samples.png") as png:
        band = png.size[1] - (10 * 34 + 2)
        assert band > 0 and (band - 2) % 13 == 0 and png.size[0] >= 2 * 34 + 2


def test_run_sample_reports_a_missing_workdir(tmp_path, monkeypatch):
    def missing(workdir, ema=True):
        raise FileNotFoundError(f"no such workdir: {workdir}")

    install_fake_load_flow(monkeypatch, missing)
    with pytest.raises(FileNotFoundError, match="cannot sample"):
        sample_mode.run_sample(str(tmp_path / "nope"), num_images=4)

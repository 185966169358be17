"""FID, sFID, Inception Score and precision/recall from Inception features, as ADM reports them.

Numpy/scipy only; the features come from ``biflow_jax.models.inception``. Definitions:

* FID (Heusel et al. 2017, arXiv:1706.08500): Frechet distance between Gaussians fitted to
  ``pool_3`` features; sFID (Nash et al. 2021, arXiv:2103.03841): the same on the spatial
  ``mixed_6/conv`` features. Both in float64 with scipy's ``sqrtm``.
* Inception Score (Salimans et al. 2016, arXiv:1606.03498): exp E_x KL(p(y|x) || p(y)), averaged
  over consecutive splits of ``split_size`` samples (ADM: 5000, so 50k samples give 10 splits;
  a shorter last split still counts). The softmax runs over all 1008 outputs of ``pool @ W``
  *without* the classifier bias, as in ADM's evaluator and Salimans et al.'s released code.
* Precision/recall (Kynkaanniemi et al. 2019, arXiv:1904.06991) with ADM's ManifoldEstimator
  settings: squared Euclidean distances, k = 3, no radius clamping.

The reference batches of ADM (Dhariwal & Nichol 2021, arXiv:2105.05233) are npz files with the
images in ``arr_0`` (uint8 NHWC) and precomputed ``mu``/``sigma`` (pool) and ``mu_s``/``sigma_s``
(spatial) statistics; ``read_reference_batch``/``write_reference_batch`` use that format.
"""

from __future__ import annotations

import dataclasses
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import linalg

FloatArray = np.ndarray


def feature_statistics(features: np.ndarray, chunk: int = 4096) -> tuple[FloatArray, FloatArray]:
    """Mean and unbiased covariance (``np.cov(rowvar=False)``) of (N, D) features, in float64.

    Two passes over row chunks, so 50k x 2048 float32 features never get a float64 copy.
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {features.shape}")
    n, d = features.shape
    mu = np.zeros(d, np.float64)
    for start in range(0, n, chunk):
        mu += features[start:start + chunk].astype(np.float64).sum(axis=0)
    mu /= n
    sigma = np.zeros((d, d), np.float64)
    for start in range(0, n, chunk):
        centred = features[start:start + chunk].astype(np.float64) - mu
        sigma += centred.T @ centred
    return mu, sigma / (n - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017, arXiv:1706.08500).

    As in ADM and pytorch-fid: when ``sqrtm`` of the product is not finite, ``eps`` is added to
    both diagonals and it is retried; an imaginary part above 1e-3 on the diagonal of the root
    is an error, a smaller one is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in size: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # near-singular products are expected
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals", RuntimeWarning,
                          stacklevel=2)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: matrix square root has an imaginary component of {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_to_statistics(features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Frechet distance of a feature set's Gaussian to (mu2, sigma2), exact for any sample count.

    With n samples in D >= n dimensions the sample covariance is S1 = Xc^T Xc (Xc the centred
    rows over sqrt(n - 1)), and the non-zero eigenvalues of S1 S2 are those of the n x n
    matrix Xc S2 Xc^T (AB and BA share them), which is symmetric PSD: Tr (S1 S2)^(1/2) comes from
    its eigenvalues, with no D x D ``sqrtm`` of a singular product (minutes for D = 2048 on a
    small CPU, and ill-conditioned). With n > D this is ``frechet_distance`` of the statistics.
    """
    x = np.asarray(features, np.float64)
    n, d = x.shape
    if n - 1 >= d:
        return frechet_distance(*feature_statistics(x), mu2, sigma2)
    if n < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {x.shape}")
    mu1 = x.mean(axis=0)
    centred = (x - mu1) / np.sqrt(n - 1)
    sigma2 = np.asarray(sigma2, np.float64)
    gram = centred @ sigma2 @ centred.T
    eig = np.linalg.eigvalsh((gram + gram.T) / 2)
    diff = mu1 - np.asarray(mu2, np.float64)
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    return float(diff @ diff + np.sum(centred * centred) + np.trace(sigma2) - 2.0 * trace_sqrt)


def inception_score(logits: np.ndarray, split_size: int = 5000, num_splits: int | None = None) -> float:
    """Mean over splits of exp(mean_x KL(p(y|x) || p_split(y))) (Salimans et al. 2016, arXiv:1606.03498).

    ADM's convention is the default: consecutive splits of ``split_size`` rows. ``num_splits``
    instead cuts the rows into that many near-equal parts (the original protocol used 10).
    The softmax is taken in float64 via log-softmax, so no probability underflows to log(0).
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"expected (N, classes) logits, got shape {logits.shape}")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    if num_splits is not None:  # boundaries i * N // num_splits, as in Salimans et al.'s code
        n = len(log_p)
        parts = [log_p[i * n // num_splits:(i + 1) * n // num_splits] for i in range(num_splits)]
    else:
        parts = [log_p[i:i + split_size] for i in range(0, len(log_p), split_size)]
    scores = []
    for part in parts:
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0, keepdims=True))
        scores.append(np.exp(np.mean(np.sum(p * (part - log_marginal), axis=1))))
    return float(np.mean(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """max(|a|^2 - 2 a.b + |b|^2, 0) for all pairs, as ADM's DistanceBlock computes it."""
    d = a @ b.T  # updated in place: one (rows, N) buffer per batch
    d *= -2.0
    d += (a * a).sum(axis=1)[:, None]
    d += (b * b).sum(axis=1)[None, :]
    return np.maximum(d, 0.0, out=d)


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 1000) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour in the same set.

    As in ADM, the row of distances includes the point itself (0) and entry k of the sorted
    row is taken, so the self-distance is skipped and the radius is that of the k-th *other*
    point (duplicates count as neighbours).
    """
    features = np.asarray(features, np.float64)
    if not 0 < k < len(features):
        raise ValueError(f"k={k} needs more than k points, got {len(features)}")
    radii = np.empty(len(features), np.float64)
    for start in range(0, len(features), batch_size):
        rows = _squared_distances(features[start:start + batch_size], features)
        radii[start:start + batch_size] = np.partition(rows, k, axis=1)[:, k]
    return radii


def _inside_any_ball(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch_size: int) -> np.ndarray:
    inside = np.zeros(len(points), bool)
    for start in range(0, len(points), batch_size):
        d = _squared_distances(points[start:start + batch_size], centres)
        inside[start:start + batch_size] = (d <= radii[None, :]).any(axis=1)
    return inside


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, arXiv:1904.06991), ADM's way.

    Precision: share of fake points within the k-NN ball of some real point; recall: share of
    real points within the k-NN ball of some fake point. Distances are computed in float64
    (ADM uses float16 when that does not overflow, so borderline points may flip there); both
    sets are held in float64 (0.8 GB per 50k x 2048) plus one (batch_size, N) block.
    """
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    real_radii = manifold_radii(real, k, batch_size)
    fake_radii = manifold_radii(fake, k, batch_size)
    precision = _inside_any_ball(fake, real, real_radii, batch_size).mean()
    recall = _inside_any_ball(real, fake, fake_radii, batch_size).mean()
    return float(precision), float(recall)


@dataclasses.dataclass
class ReferenceBatch:
    """An ADM reference batch: pool and spatial statistics, and optionally its images / pool features.

    ``pool`` (N, 2048) is not stored in ADM's files; fill it with the Inception features of
    ``images`` to get precision/recall from ``score``.
    """

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    images: np.ndarray | None = None
    pool: np.ndarray | None = None


def read_reference_batch(path: Path | str, load_images: bool = True) -> ReferenceBatch:
    """An ADM reference npz (``arr_0``, ``mu``, ``sigma``, ``mu_s``, ``sigma_s``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch not found: {path} (an ADM-style .npz with arr_0, mu, sigma, "
                                "mu_s, sigma_s)")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable npz file ({e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an npz archive with mu, sigma, mu_s, sigma_s")
    with data:
        missing = [k for k in ("mu", "sigma", "mu_s", "sigma_s") if k not in data.files]
        if missing:
            raise ValueError(f"{path}: reference batch lacks {', '.join(missing)} (has {', '.join(data.files)})")
        images = data["arr_0"] if load_images and "arr_0" in data.files else None
        return ReferenceBatch(mu=data["mu"], sigma=data["sigma"], mu_s=data["mu_s"], sigma_s=data["sigma_s"],
                              images=images)


def write_reference_batch(path: Path | str, mu: np.ndarray, sigma: np.ndarray, mu_s: np.ndarray,
                          sigma_s: np.ndarray, images: np.ndarray | None = None,
                          extra: Mapping[str, np.ndarray] | None = None) -> None:
    """Write the ADM reference format; ``images`` (uint8 NHWC) goes to ``arr_0`` when given.

    ``extra`` arrays are stored under their own keys (ADM's evaluator reads only its own).
    """
    arrays: dict[str, np.ndarray] = {"mu": np.asarray(mu), "sigma": np.asarray(sigma), "mu_s": np.asarray(mu_s),
                                     "sigma_s": np.asarray(sigma_s), **(extra or {})}
    if images is not None:
        arrays = {"arr_0": np.asarray(images), **arrays}
    with open(path, "wb") as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, **arrays)


def _field(features: Any, name: str) -> np.ndarray:
    value = features[name] if isinstance(features, Mapping) else getattr(features, name)
    return np.asarray(value)


def score(sample_features: Any, reference: ReferenceBatch, *, split_size: int = 5000, k: int = 3,
          with_precision_recall: bool = True) -> dict[str, float]:
    """fid, sfid, inception_score, precision, recall of samples against an ADM reference batch.

    ``sample_features`` has ``pool``, ``spatial`` and ``is_logits`` (attributes, e.g.
    ``InceptionFeatures`` concatenated over batches, or mapping keys). Precision/recall need
    ``reference.pool``; with ``with_precision_recall=False`` they are reported as NaN.
    """
    if with_precision_recall and reference.pool is None:
        raise ValueError("precision/recall need the reference batch's pool features: set reference.pool to the "
                         "Inception pool features of reference.images, or pass with_precision_recall=False")
    pool = _field(sample_features, "pool")
    result = {
        "fid": frechet_distance_to_statistics(pool, reference.mu, reference.sigma),
        "sfid": frechet_distance_to_statistics(_field(sample_features, "spatial"), reference.mu_s, reference.sigma_s),
        "inception_score": inception_score(_field(sample_features, "is_logits"), split_size),
        "precision": float("nan"),
        "recall": float("nan"),
    }
    if with_precision_recall:
        result["precision"], result["recall"] = precision_recall(reference.pool, pool, k)
    return result

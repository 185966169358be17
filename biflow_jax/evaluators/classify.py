"""Classifying with a trained flow: training-free (one backward pass) and a linear probe.

Training-free (R-REPA, arXiv:2511.22345; docs/rrepa.md): every block's class embedding becomes the soft
mixture softmax(lambda)^T E with lambda = 0 in R^K, L = log p(x | e), and the
prediction is argmax_k dL/dlambda_k: the class towards which moving the embedding
raises the likelihood fastest. One forward and one backward pass per image.
At lambda = 0, dL/dlambda_k = (g_k - mean_j g_j) / K with g_k = <dL/de, E_k>, so the
argmax is that of the directional derivatives g_k.

Inputs: 'dequantized' (default) are uniformly dequantised with fixed per-example
noise, like the bits/dim evaluation and the digits training data; 'clean' are the
8-bit values k mapped to k / 127.5 - 1, which lie inside their dequantisation bins.

Linear probe: mean over tokens of the hidden state after layer l of block t (forward
pass, no label: the class-mean embedding), standardised, then closed-form ridge
regression on one-hot labels. The ridge strength and the reported location are chosen
on a held-out fifth of the training split, never on the test split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from biflow_jax import likelihood, sharding
from biflow_jax.data import input_pipeline
from biflow_jax.models.tarflow import TARFlow

Array = jax.Array
Location = tuple[int, int]  # (block, layer), 1-indexed, block in forward order

INPUTS = ("dequantized", "clean")
RIDGE_STRENGTHS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # times the number of training examples


def class_scores(model: TARFlow, params: Any, x: Array) -> Array:
    """dL/dlambda (N, K) at lambda = 0, L = sum over the batch of log p(x_n | softmax(lambda_n)^T E).

    Samples are independent, so the gradient of the batch sum holds each sample's own.
    """
    if not model.num_classes:
        raise ValueError("training-free classification needs a class-conditional flow (model.num_classes > 0)")

    def log_likelihood(logits):
        out = model.apply(params, x, None, jax.nn.softmax(logits, axis=-1))
        return -jnp.sum(likelihood.nll_per_sample(out.z, out.logdets))

    return jax.grad(log_likelihood)(jnp.zeros((x.shape[0], model.num_classes), jnp.float32))


def classify_training_free(model: TARFlow, params: Any, x: Array) -> Array:
    """Predicted labels (N,) from one backward pass."""
    return jnp.argmax(class_scores(model, params, x), axis=-1)


def model_inputs(images_uint8: Array, index: Array, inputs: str, seed: int) -> Array:
    """uint8 images -> flow inputs in [-1, 1]; dequantisation noise is fixed per example index."""
    if inputs == "clean":
        return likelihood.to_unit_range(images_uint8)
    if inputs == "dequantized":
        keys = sharding.example_keys(jax.random.key(seed + 7919), index)
        return jax.vmap(likelihood.uniform_dequantize)(keys, images_uint8)
    raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")


def _batches(config: ml_collections.ConfigDict, split: str, limit: int | None = None
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """(images, labels, mask, offset) over a split, padded batches, at most `limit` real examples."""
    offset, seen = 0, 0
    for batch in input_pipeline.eval_batches(config.data, config.train.eval_batch_size, split):
        mask = batch["mask"].copy()
        if limit is not None:
            room = max(limit - seen, 0)
            mask[np.cumsum(mask) > room] = False
        if not mask.any():
            break
        yield batch["image"], batch["label"], mask, offset
        seen += int(mask.sum())
        offset += len(mask)


def training_free_top1(config: ml_collections.ConfigDict, model: TARFlow, params: Any,
                       inputs: str = "dequantized", split: str | None = None) -> float:
    """Top-1 accuracy of the training-free classifier over a split (default: the test split)."""
    seed = config.train.seed

    @jax.jit  # params are an argument, not constants baked into the executable
    def predict(flow_params, images, index):
        return classify_training_free(model, flow_params, model_inputs(images, index, inputs, seed))

    correct = total = 0
    for images, labels, mask, offset in _batches(config, split or config.data.test_split):
        pred = np.asarray(predict(params, jnp.asarray(images), offset + jnp.arange(len(mask))))
        correct += int(((pred == labels) & mask).sum())
        total += int(mask.sum())
    return correct / max(total, 1)


# ---------------------------------------------------------------------------
# Linear probe.

def probe_locations(model: TARFlow) -> tuple[Location, ...]:
    """Every (block, layer) of a small flow; for a large one, each block's layer 3L/4 (the
    paper's layer 6 of 8), so the stored features stay a few GB at most."""
    counts = model.layer_counts
    if sum(counts) <= 16:
        return tuple((b, l) for b, n in enumerate(counts, 1) for l in range(1, n + 1))
    return tuple((b, max(1, 3 * n // 4)) for b, n in enumerate(counts, 1))


def pooled_features(model: TARFlow, params: Any, x: Array,
                    locations: tuple[Location, ...] | None = None) -> dict[Location, Array]:
    """{(block, layer) 1-indexed: mean over tokens of that layer's hidden (N, C)}, no label."""
    out = model.apply(params, x, None)
    return {(b, l): out.hiddens[b - 1][l - 1].astype(jnp.float32).mean(axis=1)
            for b, l in (locations or probe_locations(model))}


def collect_features(config: ml_collections.ConfigDict, model: TARFlow, params: Any, split: str,
                     inputs: str = "dequantized", limit: int | None = None
                     ) -> tuple[dict[Location, np.ndarray], np.ndarray]:
    """Pooled features of the probe locations over a split, and the labels."""
    seed = config.train.seed

    @jax.jit
    def features(flow_params, images, index):
        return pooled_features(model, flow_params, model_inputs(images, index, inputs, seed))

    parts: dict[Location, list[np.ndarray]] = {}
    labels = []
    for images, batch_labels, mask, offset in _batches(config, split, limit):
        feats = jax.device_get(features(params, jnp.asarray(images), offset + jnp.arange(len(mask))))
        for location, f in feats.items():
            parts.setdefault(location, []).append(np.asarray(f)[mask])
        labels.append(batch_labels[mask])
    return {k: np.concatenate(v) for k, v in parts.items()}, np.concatenate(labels)


@dataclasses.dataclass(frozen=True)
class RidgeProbe:
    """Standardisation followed by a linear map to class scores."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # (C + 1, K), last row the bias

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, num_classes: int, strength: float) -> RidgeProbe:
        """argmin_W |[X 1] W - Y|^2 + strength * n * |W_X|^2 on standardised X, one-hot Y (float64)."""
        x = features.astype(np.float64)
        mean, scale = x.mean(0), x.std(0) + 1e-6
        x = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], axis=1)
        y = np.eye(num_classes)[labels]
        penalty = strength * len(x) * np.eye(x.shape[1])
        penalty[-1, -1] = 0.0  # the bias is not shrunk
        weights = np.linalg.solve(x.T @ x + penalty, x.T @ y)
        return cls(mean, scale, weights)

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = (features.astype(np.float64) - self.mean) / self.scale
        return np.argmax(x @ self.weights[:-1] + self.weights[-1], axis=-1)


def accuracy(prediction: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(prediction == labels)) if len(labels) else 0.0


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    location: Location  # chosen on the held-out part of the training split
    strength: float
    val_top1: float
    test_top1: float
    test_top1_by_location: dict[Location, float]  # each at its own validation-chosen strength


def linear_probe(train_features: dict[Location, np.ndarray], train_labels: np.ndarray,
                 test_features: dict[Location, np.ndarray], test_labels: np.ndarray,
                 num_classes: int, holdout: float = 0.2) -> ProbeResult:
    """Fit a ridge probe per location; pick strength and location on a held-out train slice."""
    n_val = max(int(len(train_labels) * holdout), 1)
    order = np.random.default_rng(0).permutation(len(train_labels))
    val, fit = order[:n_val], order[n_val:]
    best: tuple[float, Location, float] | None = None
    by_location: dict[Location, float] = {}
    for location in sorted(train_features):
        f = train_features[location]
        scores = [(accuracy(RidgeProbe.fit(f[fit], train_labels[fit], num_classes, s).predict(f[val]),
                            train_labels[val]), s) for s in RIDGE_STRENGTHS]
        val_top1, strength = max(scores, key=lambda t: (t[0], t[1]))  # ties: the stronger ridge
        probe = RidgeProbe.fit(f, train_labels, num_classes, strength)
        by_location[location] = accuracy(probe.predict(test_features[location]), test_labels)
        if best is None or val_top1 > best[0]:
            best = (val_top1, location, strength)
    assert best is not None
    val_top1, location, strength = best
    return ProbeResult(location, strength, val_top1, by_location[location], by_location)


def evaluate(config: ml_collections.ConfigDict, model: TARFlow, params: Any,
             probe_examples: int | None = 50_000) -> dict[str, Any]:
    """Both classifiers on the test split: training-free top-1 (both input kinds) and the probe."""
    results: dict[str, Any] = {}
    if model.num_classes:
        for inputs in INPUTS:
            results[f"training_free_top1_{inputs}"] = training_free_top1(config, model, params, inputs)
    train_f, train_y = collect_features(config, model, params, config.data.train_split, limit=probe_examples)
    test_f, test_y = collect_features(config, model, params, config.data.test_split)
    num_classes = model.num_classes or int(max(train_y.max(), test_y.max()) + 1)
    results["probe"] = linear_probe(train_f, train_y, test_f, test_y, num_classes)
    return results

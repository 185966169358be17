"""A sample-quality metric for the built-in 8x8 digits: a Frechet distance and label accuracy.

Inception-based FID means nothing on 8x8 grey digits, so the feature extractor here is a
small conv net trained once on the real training digits (deterministic seed) and cached
as msgpack params plus a json record. Two numbers judge generated digits:

- Frechet distance between Gaussians fitted to the classifier's penultimate features of
  generated and real test digits (lower is better). Like FID it is biased upwards for
  small sample counts, so compare models at equal counts, next to `real_reference`'s
  floor (real train vs real test, with the same 300 test digits).
- label accuracy: how often the classifier puts a class-conditional sample in its
  intended class (higher is better; real test digits score the classifier's accuracy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from biflow_jax.data.digits import digits_arrays
from biflow_jax.likelihood import to_unit_range
from biflow_jax.samplers import one_nfe
from biflow_jax.samplers.exact_inverse import images_to_uint8

Array = jax.Array

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
HIDDEN_DIM = 256
FEATURE_DIM = 64
CACHE_SUBDIR = "digits_classifier"
PARAMS_FILE = "params.msgpack"
RECORD_FILE = "record.json"
# Bump when the architecture or training recipe changes, so older caches are retrained.
CACHE_FORMAT = "digits-mlp-256-64-v1"

TRAIN_SEED = 0
TRAIN_STEPS = 400
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
EVAL_CHUNK = 1024  # images per forward pass when extracting features


class DigitsNet(nn.Module):
    """An MLP on the 64 pixels: 256 ReLU units, a 64-wide ReLU feature layer, a 10-way head.

    On 8x8 digits this matches a small conv net's accuracy (~98.7%) at a fraction of the
    CPU training time, and the test suite trains it more than once.
    """

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        """x: (N, 8, 8, 1) in [-1, 1] -> (features (N, F), logits (N, 10))."""
        x = nn.relu(nn.Dense(HIDDEN_DIM)(x.reshape(x.shape[0], -1)))
        features = nn.relu(nn.Dense(FEATURE_DIM)(x))
        return features, nn.Dense(NUM_CLASSES)(features)


@jax.jit
def _apply_net(params: Any, images_uint8: Array) -> tuple[Array, Array]:
    return DigitsNet().apply(params, to_unit_range(images_uint8))


@dataclasses.dataclass
class DigitsClassifier:
    """A trained DigitsNet: uint8 digits in, penultimate features or logits out."""

    params: Any
    test_accuracy: float
    trained: bool  # True when this load trained it (no usable cache), False when read from cache

    def features_and_logits(self, images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, 8, 8[, 1]) -> (float32 (N, F) penultimate features, float32 (N, 10) logits)."""
        images = _as_digit_batch(images_uint8)
        feats, logits = [np.zeros((0, FEATURE_DIM), np.float32)], [np.zeros((0, NUM_CLASSES), np.float32)]
        for start in range(0, len(images), EVAL_CHUNK):
            chunk_feats, chunk_logits = _apply_net(self.params, images[start:start + EVAL_CHUNK])
            feats.append(np.asarray(chunk_feats))
            logits.append(np.asarray(chunk_logits))
        return np.concatenate(feats), np.concatenate(logits)

    def features(self, images_uint8: np.ndarray) -> np.ndarray:
        """uint8 (N, 8, 8[, 1]) -> float32 (N, F) penultimate features."""
        return self.features_and_logits(images_uint8)[0]

    def logits(self, images_uint8: np.ndarray) -> np.ndarray:
        """uint8 (N, 8, 8[, 1]) -> float32 (N, 10) class logits."""
        return self.features_and_logits(images_uint8)[1]


def _as_digit_batch(images_uint8: np.ndarray) -> np.ndarray:
    """Checks dtype and shape, so float images in [-1, 1] are not silently misread as 0..255."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 digits in 0..255, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"expected digits of shape (N, 8, 8) or (N, 8, 8, 1), got {images.shape}")
    return images


_OPTIMIZER = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


@jax.jit
def _train_step(params: Any, opt_state: Any, images: Array, labels: Array) -> tuple[Any, Any]:
    """One AdamW step on softmax cross-entropy (module level, so retraining reuses the compile)."""

    def loss_fn(p):
        logits = DigitsNet().apply(p, to_unit_range(images))[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = _OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _param_shapes() -> Any:
    """DigitsNet's parameter tree as ShapeDtypeStructs (traced, nothing computed)."""
    return jax.eval_shape(DigitsNet().init, jax.random.PRNGKey(0), jnp.zeros((1,) + IMAGE_SHAPE))


def _init_params(seed: int) -> Any:
    """LeCun-normal kernels and zero biases drawn with NumPy.

    Same scheme as flax's Dense default, but without compiling JAX's random number
    generator: on a 2-core CPU that compile alone takes seconds, longer than training.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, _param_shapes())


def train_classifier(seed: int = TRAIN_SEED, steps: int = TRAIN_STEPS) -> Any:
    """DigitsNet params trained with AdamW on the real training digits, deterministic in seed."""
    train_images, train_labels = digits_arrays()["train"]
    params = _init_params(seed)
    opt_state = _OPTIMIZER.init(params)
    rng = np.random.default_rng(seed)
    order = np.zeros(0, np.int64)
    for _ in range(steps):
        if len(order) < BATCH_SIZE:  # reshuffle each epoch, dropping the ragged tail
            order = rng.permutation(len(train_labels))
        batch, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        params, opt_state = _train_step(params, opt_state, train_images[batch], train_labels[batch])
    return params


def _test_accuracy(params: Any) -> float:
    test_images, test_labels = digits_arrays()["test"]
    logits = DigitsClassifier(params, test_accuracy=float("nan"), trained=False).logits(test_images)
    return float(np.mean(logits.argmax(-1) == test_labels))


def _atomic_write(path: str, data: bytes) -> None:
    """Write-then-rename, so a killed writer leaves the old file or none, never half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _save_cache(cache_dir: str, params: Any, test_accuracy: float) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    blob = flax.serialization.to_bytes(params)
    _atomic_write(os.path.join(cache_dir, PARAMS_FILE), blob)
    record = {
        "format": CACHE_FORMAT,
        "params_sha256": hashlib.sha256(blob).hexdigest(),
        "test_accuracy": test_accuracy,
        "feature_dim": FEATURE_DIM,
        "train_seed": TRAIN_SEED,
        "train_steps": TRAIN_STEPS,
    }
    # The record goes last and names the params' hash: a params file without a matching
    # record (a crash between the two writes, a concurrent writer) reads as no cache.
    _atomic_write(os.path.join(cache_dir, RECORD_FILE), json.dumps(record, indent=1).encode())


def _load_cache(cache_dir: str) -> Any | None:
    """The cached params, or None with a logged reason when absent, corrupted or mismatched."""
    record_path = os.path.join(cache_dir, RECORD_FILE)
    params_path = os.path.join(cache_dir, PARAMS_FILE)
    if not os.path.exists(record_path) or not os.path.exists(params_path):
        return None
    try:
        with open(record_path, "rb") as f:
            record = json.loads(f.read())
        if record.get("format") != CACHE_FORMAT:
            raise ValueError(f"cache format {record.get('format')!r}, expected {CACHE_FORMAT!r}")
        with open(params_path, "rb") as f:
            blob = f.read()
        if hashlib.sha256(blob).hexdigest() != record.get("params_sha256"):
            raise ValueError("params file does not match the hash in its record")
        template = _param_shapes()
        params = flax.serialization.from_bytes(template, blob)  # raises on a different tree
        want = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), template)
        got = jax.tree_util.tree_map(lambda a: (np.shape(a), np.asarray(a).dtype), params)
        if want != got:
            raise ValueError("parameter shapes differ from DigitsNet's")
        return jax.tree_util.tree_map(jnp.asarray, params)
    # Any failure to read the cache means "retrain": a stale or damaged cache must never
    # stop an evaluation, and msgpack/flax raise a variety of exception types on garbage.
    except Exception as e:  # noqa: BLE001
        logging.warning("digits classifier cache in %s is unusable (%s); retraining", cache_dir, e)
        return None


def classifier_dir(workdir: str) -> str:
    """Where a workdir keeps its digits classifier cache."""
    return os.path.join(workdir, CACHE_SUBDIR)


def load_or_train_classifier(cache_dir: str) -> DigitsClassifier:
    """The cached classifier in cache_dir, or a freshly trained one (then cached there).

    A missing, corrupted or mismatched cache is retrained and overwritten. The test
    accuracy is recomputed on load, so the reported number is that of the params in use.
    """
    params = _load_cache(cache_dir)
    trained = params is None
    if trained:
        params = train_classifier()
    classifier = DigitsClassifier(params=params, test_accuracy=_test_accuracy(params), trained=trained)
    if trained:
        try:
            _save_cache(cache_dir, params, classifier.test_accuracy)
        except OSError as e:  # an unwritable workdir costs a retrain next time, not this evaluation
            logging.warning("could not cache the digits classifier in %s (%s)", cache_dir, e)
    logging.info("digits classifier (%s): test accuracy %.4f",
                 "trained" if trained else "cached", classifier.test_accuracy)
    return classifier


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, F) feature sets, in float64.

    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The last trace equals
    that of (S_a^(1/2) S_b S_a^(1/2))^(1/2), a symmetric PSD matrix, so it is computed
    from eigenvalues with eigh: real by construction (no complex parts to discard) and
    stable for the singular covariances that dead ReLU units or N < F produce.
    """
    a = np.asarray(feats_a, np.float64)
    b = np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (N, F) feature sets with equal F, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set to fit a covariance, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))  # rounding can leave -1e-12 for identical sets


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix, negative rounding-noise eigenvalues clipped to 0."""
    eig, vecs = np.linalg.eigh((cov + cov.T) / 2)
    return (vecs * np.sqrt(np.clip(eig, 0.0, None))) @ vecs.T


def evaluate_samples(classifier: DigitsClassifier, generated_uint8: np.ndarray,
                     intended_labels: np.ndarray | None,
                     real_test_uint8: np.ndarray) -> dict[str, Any]:
    """Frechet distance to real test digits, and the classifier's agreement with intended labels.

    intended_labels: (N,) ints in 0..9; -1 marks an unconditional sample, which counts
    for the Frechet distance but not for label accuracy. None (or all -1) gives
    label_accuracy None. `num` is the number of generated samples.
    """
    generated = _as_digit_batch(generated_uint8)
    feats, logits = classifier.features_and_logits(generated)
    frechet = frechet_distance(feats, classifier.features(real_test_uint8))
    label_accuracy = None
    if intended_labels is not None:
        labels = np.asarray(intended_labels).reshape(-1)
        if labels.shape != (len(generated),):
            raise ValueError(f"{len(labels)} intended labels for {len(generated)} samples")
        if np.any((labels < -1) | (labels >= NUM_CLASSES)):
            raise ValueError(f"intended labels must be in -1..{NUM_CLASSES - 1}")
        labelled = labels >= 0
        if labelled.any():
            label_accuracy = float(np.mean(logits[labelled].argmax(-1) == labels[labelled]))
    return {"frechet": frechet, "label_accuracy": label_accuracy, "num": int(len(generated))}


def real_reference(classifier: DigitsClassifier) -> dict[str, float]:
    """The floor for model numbers: FD(real train, real test) and the classifier's test accuracy."""
    arrays = digits_arrays()
    frechet = frechet_distance(classifier.features(arrays["train"][0]), classifier.features(arrays["test"][0]))
    return {"frechet": frechet, "test_accuracy": classifier.test_accuracy}


class SampleQuality:
    """Evaluator: BiFlow 1-NFE samples of G scored by the digits classifier (stage 2).

    `per_class` samples of every class from fixed noise, at the guidance scale G was trained
    to take (biflow.guidance when training-time CFG is on, else 0); figures are the Frechet
    distance to the real test digits and the label accuracy.
    """

    name = "digits_quality"

    def __init__(self, config: Any, flow_run: Any, reverse: Any, every: int, per_class: int = 30, seed: int = 0):
        if config.data.name != "digits":
            raise ValueError("the digits_quality evaluator scores 8x8 digits only (data.name='digits')")
        self.every = every
        flow = flow_run.model
        classes = max(flow.num_classes, 1)
        self.labels = np.repeat(np.arange(classes, dtype=np.int32), per_class) if flow.num_classes else None
        n = classes * per_class
        z = jax.random.normal(jax.random.key(seed), (n, flow.num_tokens, flow.token_dim))
        w = float(config.biflow.guidance) if config.biflow.cfg_training else 0.0
        to_images = one_nfe.token_images(flow.patch_size, flow.img_size, flow.in_channels)
        labels = None if self.labels is None else jnp.asarray(self.labels)
        self.sample = jax.jit(lambda params: one_nfe.one_nfe_sample(reverse, params, z, labels, w,
                                                                    to_images=to_images))
        self.cache_dir = classifier_dir(flow_run.workdir)
        self.classifier: DigitsClassifier | None = None

    def __call__(self, params: Any) -> dict[str, float]:
        if self.classifier is None:
            self.classifier = load_or_train_classifier(self.cache_dir)
        images = images_to_uint8(self.sample(params))
        scores = evaluate_samples(self.classifier, images, self.labels, digits_arrays()["test"][0])
        out = {"digits_frechet": scores["frechet"]}
        if scores["label_accuracy"] is not None:
            out["digits_label_accuracy"] = scores["label_accuracy"]
        return out

"""Digits metric: the classifier, its cache, the Frechet distance and label accuracy."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import scipy.linalg

from biflow_jax.data.digits import digits_arrays
from biflow_jax.evaluators import digits_quality


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("workdir") / digits_quality.CACHE_SUBDIR)


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return digits_quality.load_or_train_classifier(cache_dir)


@pytest.fixture(scope="module")
def digits():
    return digits_arrays()


def _params_equal(a, b) -> bool:
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, a, b)))


def test_classifier_learns_digits(classifier, digits, cache_dir):
    assert classifier.trained
    images, labels = digits["test"]
    accuracy = np.mean(classifier.logits(images).argmax(-1) == labels)
    assert accuracy > 0.9
    assert classifier.test_accuracy == pytest.approx(accuracy, abs=0)
    with open(os.path.join(cache_dir, digits_quality.RECORD_FILE)) as f:
        assert json.load(f)["test_accuracy"] == pytest.approx(accuracy, abs=0)


def test_features_shape_and_input_checks(classifier, digits):
    images = digits["test"][0][:20]
    feats = classifier.features(images)
    assert feats.shape == (20, digits_quality.FEATURE_DIM)
    # (N, 8, 8) without the channel axis reads the same digits.
    np.testing.assert_array_equal(classifier.features(images[..., 0]), feats)
    # Float images (e.g. a sampler's [-1, 1] output) must be converted first, not misread.
    with pytest.raises(ValueError, match="uint8"):
        classifier.features(images.astype(np.float32) / 127.5 - 1)
    with pytest.raises(ValueError, match="shape"):
        classifier.features(np.zeros((2, 16, 16, 1), np.uint8))


def test_cache_is_reused(classifier, cache_dir):
    params_path = os.path.join(cache_dir, digits_quality.PARAMS_FILE)
    mtime = os.stat(params_path).st_mtime_ns
    again = digits_quality.load_or_train_classifier(cache_dir)
    assert not again.trained
    assert os.stat(params_path).st_mtime_ns == mtime
    assert _params_equal(again.params, classifier.params)
    assert again.test_accuracy == classifier.test_accuracy


@pytest.mark.parametrize("damage", ["garbage_params", "truncated_params", "garbage_record", "old_format"])
def test_damaged_cache_is_retrained(classifier, cache_dir, tmp_path, damage):
    copy = str(tmp_path / "cache")
    shutil.copytree(cache_dir, copy)
    params_path = os.path.join(copy, digits_quality.PARAMS_FILE)
    record_path = os.path.join(copy, digits_quality.RECORD_FILE)
    if damage == "garbage_params":
        with open(params_path, "wb") as f:
            f.write(b"\x00not msgpack at all\xff" * 7)
    elif damage == "truncated_params":
        with open(params_path, "rb") as f:
            blob = f.read()
        with open(params_path, "wb") as f:
            f.write(blob[: len(blob) // 2])
    elif damage == "garbage_record":
        with open(record_path, "w") as f:
            f.write("{ not json")
    else:
        with open(record_path) as f:
            record = json.load(f)
        record["format"] = "digits-convnet-v0"
        with open(record_path, "w") as f:
            json.dump(record, f)

    retrained = digits_quality.load_or_train_classifier(copy)
    assert retrained.trained
    # Training is seeded: the retrained net is the same net, and it repaired the cache.
    assert _params_equal(retrained.params, classifier.params)
    assert not digits_quality.load_or_train_classifier(copy).trained


def _with_moments(samples: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Rescales samples so their sample mean and (ddof=1) covariance are exactly mean, diag(std^2)."""
    centred = samples - samples.mean(0)
    whitening = np.linalg.inv(np.linalg.cholesky(np.atleast_2d(np.cov(centred, rowvar=False))))
    return centred @ whitening.T * std + mean


def test_frechet_1d_closed_form():
    rng = np.random.default_rng(0)
    a = _with_moments(rng.standard_normal((500, 1)), np.array([0.0]), np.array([1.0]))
    b = _with_moments(rng.standard_normal((700, 1)), np.array([1.0]), np.array([2.0]))
    # (0 - 1)^2 + 1 + 4 - 2 * 1 * 2 = 2
    assert digits_quality.frechet_distance(a, b) == pytest.approx(2.0, abs=1e-9)


def test_frechet_diagonal_closed_form_and_identity():
    rng = np.random.default_rng(1)
    mean_a, std_a = rng.normal(size=6), rng.uniform(0.5, 2.0, 6)
    mean_b, std_b = rng.normal(size=6), rng.uniform(0.5, 2.0, 6)
    a = _with_moments(rng.standard_normal((400, 6)), mean_a, std_a)
    b = _with_moments(rng.standard_normal((300, 6)), mean_b, std_b)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((std_a - std_b) ** 2)
    assert digits_quality.frechet_distance(a, b) == pytest.approx(expected, abs=1e-9)
    assert digits_quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_full_covariance_matches_textbook_formula():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 8)) @ rng.normal(size=(8, 8)) + rng.normal(size=8)
    b = rng.standard_normal((200, 8)) @ rng.normal(size=(8, 8))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    textbook = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)).real)
    fd = digits_quality.frechet_distance(a, b)
    assert fd == pytest.approx(textbook, rel=1e-7)
    assert digits_quality.frechet_distance(b, a) == pytest.approx(fd, rel=1e-9)


def test_frechet_singular_covariance():
    # Dead ReLU units are constant columns; fewer samples than features makes S rank-deficient.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(5, 4)) + 1.0
    dead_a, dead_b = np.full((6, 30), 0.0), np.full((5, 30), 0.5)
    fd = digits_quality.frechet_distance(np.hstack([a, dead_a]), np.hstack([b, dead_b]))
    assert np.isfinite(fd)
    assert fd == pytest.approx(digits_quality.frechet_distance(a, b) + 30 * 0.25, abs=1e-8)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError):
        digits_quality.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        digits_quality.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_label_accuracy_true_shuffled_and_unconditional(classifier, digits):
    images, labels = digits["test"]
    true = digits_quality.evaluate_samples(classifier, images, labels, images)
    assert true["num"] == len(labels)
    assert true["label_accuracy"] == pytest.approx(classifier.test_accuracy, abs=0)
    assert true["label_accuracy"] > 0.9
    assert true["frechet"] == pytest.approx(0.0, abs=1e-6)

    shuffled = np.random.default_rng(0).permutation(labels)
    chance = digits_quality.evaluate_samples(classifier, images, shuffled, images)["label_accuracy"]
    assert 0.02 < chance < 0.2

    # -1 marks unconditional samples: they count for the FD, not for label accuracy.
    half = labels.copy()
    half[::2] = -1
    partial = digits_quality.evaluate_samples(classifier, images, half, images)
    predicted = classifier.logits(images[1::2]).argmax(-1)
    assert partial["label_accuracy"] == pytest.approx(np.mean(predicted == labels[1::2]), abs=0)
    assert digits_quality.evaluate_samples(classifier, images, None, images)["label_accuracy"] is None
    with pytest.raises(ValueError):
        digits_quality.evaluate_samples(classifier, images, labels[:10], images)


def test_real_digits_are_closer_than_noise(classifier, digits):
    reference = digits_quality.real_reference(classifier)
    assert reference["test_accuracy"] == classifier.test_accuracy
    test_images = digits["test"][0]
    noise = np.random.default_rng(0).integers(0, 256, test_images.shape, dtype=np.uint8)
    noise_fd = digits_quality.evaluate_samples(classifier, noise, None, test_images)["frechet"]
    assert 0.0 < reference["frechet"] < noise_fd / 10

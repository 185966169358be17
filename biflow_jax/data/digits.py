"""TFDS builder for scikit-learn's 8x8 handwritten digits: the built-in, offline dataset.

scikit-learn ships the 1,797 real UCI digits inside the package, so this builds with
no download. Pixel intensities 0..16 are rescaled to 0..255 uint8; the train/test
split is a fixed seeded permutation (1,497 / 300), the same on every machine.
"""

from __future__ import annotations

import contextlib
import io
import sys

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 300
SPLIT_SEED = 20251210


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train'|'test': (uint8 images (N, 8, 8, 1), int64 labels (N,))}."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    test, train = order[:NUM_TEST], order[NUM_TEST:]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits as a TFDS dataset named `sklearn_digits`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "8x8x1 uint8 images, 10 classes, fixed 1497/300 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        arrays = digits_arrays()
        return {name: self._generate_examples(*arrays[name]) for name in ("train", "test")}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}



@contextlib.contextmanager
def quiet_tfds():
    """TFDS' console output held back: its banner, progress bars and absl warnings (e.g. about an empty
    dataset folder on first use), shown only if what runs inside fails."""
    from absl import logging

    captured, verbosity = io.StringIO(), logging.get_verbosity()
    tfds.display_progress_bar(False)
    logging.set_verbosity(logging.ERROR)
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        logging.set_verbosity(verbosity)
        tfds.display_progress_bar(True)


def prepared_builder(data_dir: str | None) -> SklearnDigits:
    """The digits builder with its files written: once, quietly (TFDS would announce "Downloading and
    preparing dataset" and draw progress bars, though nothing is downloaded)."""
    with quiet_tfds():
        builder = SklearnDigits(data_dir=data_dir)
        ready = builder.is_prepared()
    if not ready:
        from biflow_jax.console import say

        say(f"building the digits dataset from scikit-learn into {builder.data_dir} (once; nothing is downloaded)")
        with quiet_tfds():
            builder.download_and_prepare()
    return builder

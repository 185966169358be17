"""TFDS + tf.data input: per-process shards, deterministic resumable order, global arrays.

The order of training batches is a pure function of (seed, position): epoch e is the
process's shard shuffled with seed (seed, e), and a run resumed at batch `position`
rebuilds the stream from that epoch and skips the rest of it, so it sees exactly the
batches an uninterrupted run would. Images stay uint8 until the device; noise and
dequantisation happen inside the jitted step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from biflow_jax.data import adm_resize, image_folder
from biflow_jax.errors import DataError

# tf.data must not grab the accelerator or all host threads JAX needs.
tf.config.set_visible_devices([], "GPU")

BUILTIN = "digits"
FOLDER = "folder"  # FOLDER/<split>/<class>/<images>: biflow_jax.data.image_folder


def _builder(data_cfg: Any) -> tfds.core.DatasetBuilder:
    data_dir = data_cfg.get("data_dir") or None
    if data_cfg.name == BUILTIN:
        from biflow_jax.data import digits

        builder = digits.prepared_builder(data_dir)  # offline and quiet: built from scikit-learn on first use
        return builder
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"data.data_dir={data_dir!r} does not exist")
    try:
        builder = tfds.builder(data_cfg.name, data_dir=data_dir)
    except Exception as e:  # unknown name: tfds raises a registry error
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"unknown dataset data.name={data_cfg.name!r} ({first_line}); use 'digits', "
                        "'folder' or a TFDS name prepared in data.data_dir") from e
    if not builder.is_prepared():
        raise DataError(f"dataset {data_cfg.name!r} is not prepared in data_dir={builder.data_dir!r}; "
                        "this code never downloads: prepare it there first (tfds build / manual_dir)")
    return builder


def dataset_info(data_cfg: Any) -> dict[str, Any]:
    """Sizes of the splits, used for epochs and eval."""
    if data_cfg.name == "latents":  # VAE posteriors written by biflow_jax.data.latents.encode
        from biflow_jax.data import latents

        return latents.dataset_info(data_cfg)
    if data_cfg.name == FOLDER:  # checked whole here: classes, empty folders, unreadable files
        return image_folder.dataset_info(data_cfg)
    builder = _builder(data_cfg)
    check_class_count(data_cfg, builder)
    return {"num_examples": {k: v.num_examples for k, v in builder.info.splits.items()}}


def check_class_count(data_cfg: Any, builder: tfds.core.DatasetBuilder) -> None:
    """A conditional config needs the TFDS label feature, and its class count must match data.num_classes
    (labels are never clipped)."""
    features, key = builder.info.features, data_cfg.get("label_key", "label")
    feature = features[key] if features is not None and key in features.keys() else None
    if data_cfg.num_classes and feature is None:
        have = sorted(features.keys()) if features is not None else []
        raise DataError(f"dataset {data_cfg.name!r} has no label feature {key!r} (features: {have}) but "
                        f"data.num_classes={data_cfg.num_classes}: a class-conditional flow needs labelled data; "
                        "use a labelled dataset (or data.label_key), or data.num_classes=0 and model.num_classes=0")
    classes = getattr(feature, "num_classes", None)
    if data_cfg.num_classes and classes and classes != data_cfg.num_classes:
        raise DataError(f"dataset {data_cfg.name!r} has {classes} classes but data.num_classes="
                        f"{data_cfg.num_classes}; set data.num_classes={classes} (and model.num_classes)")


def _source(data_cfg: Any, split: str) -> tf.data.Dataset:
    """This process's shard of `split`, in a fixed order, as (image uint8, label) pairs (TFDS images resized)."""
    if data_cfg.name == "latents":  # ({'mean', 'std'} of the image and its flip, label) pairs
        from biflow_jax.data import latents

        return latents.source(data_cfg, split)
    if data_cfg.name == FOLDER:  # (file path, label) pairs: decoded in `prepare`, after shuffling
        return image_folder.source(data_cfg, split)
    builder = _builder(data_cfg)
    if split not in builder.info.splits:
        raise DataError(f"split {split!r} not in dataset {data_cfg.name!r} (has {sorted(builder.info.splits)})")
    shard = tfds.split_for_jax_process(split, drop_remainder=True)
    ds = builder.as_dataset(split=shard, shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1))
    label_key = data_cfg.get("label_key", "label")
    # Resized here, before the training stream batches: full ImageNet's images differ in size.
    size, channels = data_cfg.image_size, data_cfg.channels
    return ds.map(lambda ex: (_resize(ex["image"], size, channels), tf.cast(ex.get(label_key, -1), tf.int32)),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _resize(image: tf.Tensor, size: int, channels: int) -> tf.Tensor:
    """`channels` channels, then ADM's centre crop to (size, size) (box halving, bicubic, centre square:
    `data.adm_resize`, as ADM's reference batches were made); an image already that size is kept."""
    image = image[..., :channels] if image.shape[-1] and image.shape[-1] > channels else image
    if image.shape[-1] == 1 and channels == 3:
        image = tf.image.grayscale_to_rgb(image)
    if image.shape[0] == size and image.shape[1] == size:
        return image
    out = tf.numpy_function(lambda x: adm_resize.center_crop_array(x, size), [image], tf.uint8, stateful=False)
    return tf.ensure_shape(out, (size, size, channels))


def train_batches(data: Any, batch_size: int, seed: int, position: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of this process's training batches (global `batch_size`), from batch `position`."""
    local_batch = local_batch_size(batch_size)
    source = _source(data, data.train_split)
    size = int(source.cardinality().numpy())
    if size < local_batch:
        raise DataError(f"the training split has {size} examples per process, fewer than a batch ({local_batch})")
    per_epoch = size // local_batch  # whole batches per epoch; the tail of each epoch is dropped
    start_epoch, offset = divmod(position, per_epoch)
    shuffle_buffer = min(size, data.get("shuffle_buffer", 50_000))

    def epoch(e):
        ds = source.shuffle(shuffle_buffer, seed=tf.cast(seed, tf.int64) * 1_000_003 + e,
                            reshuffle_each_iteration=False)
        ds = ds.batch(local_batch, drop_remainder=True)
        return ds.map(lambda img, lab: (img, lab, tf.fill([local_batch], e)))

    ds = tf.data.Dataset.range(start_epoch, 1 << 40).flat_map(epoch).skip(offset)
    ds = ds.unbatch().enumerate(start=position * local_batch)

    def prepare(index, example):
        image, label, _ = example
        if data.name == "latents":  # the stored flip instead of flipping pixels
            from biflow_jax.data import latents

            flip = data.get("random_flip", False) and tf.random.stateless_uniform(
                [], seed=tf.stack([tf.cast(seed, tf.int64), index])) < 0.5
            return latents.example(image, label, flip)
        checks = {}  # folder data: the file and whether it decoded, for checked_batches
        if data.name == FOLDER:
            checks["path"] = image
            image, checks["readable"] = image_folder.decode(image, data.channels)
        image = _resize(image, data.image_size, data.channels)
        if data.get("random_flip", False):
            image = tf.image.stateless_random_flip_left_right(
                image, seed=tf.stack([tf.cast(seed, tf.int64), index]))
        return {"image": image, "label": label, **checks}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return checked_batches(naming_damaged_files(ds.as_numpy_iterator(), data, data.train_split), data)


def eval_batches(data: Any, batch_size: int, split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One pass over a split (default data.test_split), padded to whole batches of global size
    `batch_size`; `mask` marks the real examples."""
    local_batch = local_batch_size(batch_size)
    ds = _source(data, split or data.test_split)
    if data.name == "latents":
        from biflow_jax.data import latents

        ds = ds.map(lambda img, lab: {**latents.example(img, lab, False), "mask": tf.constant(True)})
    elif data.name == FOLDER:
        ds = ds.map(lambda path, lab: dict(zip(("image", "readable"), image_folder.decode(path, data.channels)),
                                           path=path, label=lab, mask=tf.constant(True)))
        ds = ds.map(lambda ex: {**ex, "image": _resize(ex["image"], data.image_size, data.channels)})
    else:
        ds = ds.map(lambda img, lab: {"image": _resize(img, data.image_size, data.channels), "label": lab,
                                      "mask": tf.constant(True)})
    ds = ds.padded_batch(local_batch).prefetch(tf.data.AUTOTUNE)  # variable last batch, padded below
    for batch in checked_batches(naming_damaged_files(ds.as_numpy_iterator(), data, split or data.test_split), data):
        n = len(batch["label"])
        if n < local_batch:
            pad = local_batch - n
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        yield batch


def split_arrays(data: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split (this process's shard) as numpy arrays: small datasets and baselines only."""
    images, labels = [], []
    for batch in eval_batches(data, jax.process_count() * 256, split):
        keep = batch["mask"]
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
    return np.concatenate(images), np.concatenate(labels)


def naming_damaged_files(batches: Iterator[Any], data: Any, split: str) -> Iterator[Any]:
    """`batches`, with tf.data's DataLossError (a record failing its checksum, which names no file) turned
    into a DataError naming the damaged shard (latents) or the dataset."""
    try:
        yield from batches
    except tf.errors.DataLossError as err:
        from biflow_jax.data import latents

        if data.name == "latents":
            where = latents.damaged_shard(data.folder, split)
        else:
            where = f"a file of dataset {data.name!r} split {split!r} ({latents.tf_error_text(err)})"
        raise DataError(f"damaged data: {where}; re-create or re-download it") from None


def checked_batches(batches: Iterator[dict[str, np.ndarray]], data: Any) -> Iterator[dict[str, np.ndarray]]:
    """Batches whose labels lie in [0, data.num_classes) and whose images all decoded; else a DataError that
    names the label or the file (an out-of-range label would be clipped silently by the class embedding)."""
    for batch in batches:
        if "readable" in batch:
            readable, paths = batch.pop("readable"), batch.pop("path")
            if not readable.all():
                path = paths[np.argmin(readable)].decode()
                raise DataError(f"image file {path!r} in data.folder could not be decoded; remove it, or set "
                                "data.skip_unreadable=True to leave out every such file (all are decoded at start)")
        labels = batch["label"][batch["mask"]] if "mask" in batch else batch["label"]
        classes = data.num_classes
        if classes and labels.size and (labels.min() < 0 or labels.max() >= classes):
            bad = int(labels[(labels < 0) | (labels >= classes)][0])
            raise DataError(f"label {bad} in dataset {data.name!r} is outside [0, {classes}) "
                            f"(data.num_classes={classes}); set data.num_classes (and model.num_classes) to the "
                            "dataset's class count")
        yield batch


def local_batch_size(global_batch: int) -> int:
    if global_batch % jax.process_count():
        raise ValueError(f"batch size {global_batch} is not divisible by the process count {jax.process_count()}")
    return global_batch // jax.process_count()

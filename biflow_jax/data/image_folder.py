"""Image-folder datasets, FOLDER/<split>/<class>/<image>: checked at start, sharded per process.

The class names are the train split's class folders, sorted; every split maps them to the
same labels. Each split's file list is fixed (sorted, then permuted with a constant seed),
cut to a multiple of the process count and dealt out round-robin, so every process gets
the same number of examples and the order does not depend on the file system. Images
are decoded where the pipeline needs them (after shuffling file names, so the shuffle
buffer holds names, not pixels), as RGB and then converted to `data.channels`.

Unreadable files: a cheap check at start (the format's signature, its end marker, and the
pixel count its header declares against `data.max_pixels`, so a small file cannot claim a
huge image) names them before anything is written; a file that passes it but does not
decode is named when it is reached. With `data.skip_unreadable`, every file is decoded
once at start and the unreadable ones are left out (with a count), before the order is
fixed, so a resumed run still sees the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from biflow_jax.errors import DataError

SUFFIXES = (".jpg", ".jpeg", ".png")
SIGNATURES = {".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".png": b"\x89PNG\r\n\x1a\n"}
END_MARKERS = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND\xaeB`\x82"}
DEFAULT_MAX_PIXELS = int(1.5 * 4096**2)  # data.max_pixels when a config lacks it
# JPEG start-of-frame markers (they hold the size); C4, C8 and CC share the range but are other segments.
JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """One split's readable files in their fixed order, with labels, and what was left out."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    skipped: tuple[str, ...]


def _class_dirs(split_dir: str) -> list[str]:
    return sorted(d for d in os.listdir(split_dir) if not d.startswith(".")
                  and os.path.isdir(os.path.join(split_dir, d)))


def _images(class_dir: str) -> list[str]:
    return sorted(os.path.join(class_dir, f) for f in os.listdir(class_dir)
                  if not f.startswith(".") and f.lower().endswith(SUFFIXES))


def jpeg_size(f: Any) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment, walking the segments from the start of
    the open file `f` without decoding; None when no frame header is found."""
    f.seek(2)  # after SOI
    for _ in range(1000):
        byte = f.read(1)
        while byte == b"\xff":  # fill bytes before a marker
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        length = f.read(2)
        if len(length) < 2:
            return None
        if marker in JPEG_FRAMES:
            frame = f.read(5)  # precision, height, width
            return (int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")) if len(frame) == 5 else None
        f.seek(int.from_bytes(length, "big") - 2, os.SEEK_CUR)
        if f.read(1) != b"\xff":
            return None
        f.seek(-1, os.SEEK_CUR)
    return None


def declared_size(f: Any, suffix: str) -> tuple[int, int] | None:
    """(width, height) an image file's header declares (PNG: the IHDR chunk; JPEG: the frame header)."""
    if suffix == ".png":
        f.seek(16)
        ihdr = f.read(8)
        return (int.from_bytes(ihdr[:4], "big"), int.from_bytes(ihdr[4:], "big")) if len(ihdr) == 8 else None
    return jpeg_size(f)


def header_problem(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, key: str = "data.max_pixels") -> str | None:
    """Why `path` cannot be an image of its suffix's format (None when it may be): empty, wrong
    signature, no end marker (a truncated file), or more pixels declared than `max_pixels` (decoding
    would take their memory whatever the file size). Reads its header and last bytes only."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 16))
            tail = f.read(16)
            dims = declared_size(f, suffix) if size and head.startswith(SIGNATURES[suffix]) else None
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if size == 0:
        return "is empty"
    if not head.startswith(SIGNATURES[suffix]):
        return f"is not a {suffix[1:].upper()} image"
    # JPEG writers may pad after the end marker; PNG ends with the IEND chunk.
    if END_MARKERS[suffix] not in (tail if suffix == ".png" else tail.rstrip(b"\x00")):
        return "is truncated (no end marker)"
    if dims is not None and dims[0] * dims[1] > max_pixels:
        return pixels_problem(dims, max_pixels, key)
    return None


def pixels_problem(dims: tuple[int, int], max_pixels: int, key: str = "data.max_pixels") -> str:
    return (f"declares {dims[0]}x{dims[1]} pixels, more than {key}={max_pixels} (decoding it would take that "
            f"much memory; raise {key} if it is a real image)")


def decode(path: tf.Tensor, channels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(uint8 image with `channels`, readable): a file that does not decode gives a 1x1 black image and
    False instead of stopping tf.data with an error that does not name it (a real 1x1 image is True)."""
    def load(p):
        image = tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False)
        return tf.image.rgb_to_grayscale(image) if channels == 1 else image, tf.constant(True)

    good = tf.data.Dataset.from_tensors(path).map(load).ignore_errors()
    marker = tf.data.Dataset.from_tensors((tf.zeros([1, 1, channels], tf.uint8), tf.constant(False)))
    image, readable = good.concatenate(marker).take(1).get_single_element()
    return tf.ensure_shape(image, [None, None, channels]), readable


def _undecodable(paths: list[str]) -> set[str]:
    """The files of `paths` that do not decode (every one is decoded once, in parallel)."""
    ds = tf.data.Dataset.from_tensor_slices(paths).map(lambda p: (p, decode(p, 3)[1]),
                                                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return {p.decode() for p, ok in ds.as_numpy_iterator() if not ok}


@functools.lru_cache(maxsize=16)
def scan(folder: str, split: str, classes: tuple[str, ...], skip_unreadable: bool,
         max_pixels: int = DEFAULT_MAX_PIXELS) -> FolderSplit:
    """One split, checked: every class folder known and non-empty, every file readable (or skipped)."""
    split_dir = os.path.join(folder, split)
    if not os.path.isdir(split_dir):
        raise DataError(f"data.folder={folder!r} has no split folder {split!r} "
                        f"(has {_class_dirs(folder)}; expected FOLDER/<split>/<class>/<image files>)")
    found = _class_dirs(split_dir)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"split {split!r} of data.folder={folder!r} has class folders {unknown} that the train "
                        f"split does not have (its classes: {list(classes)})")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _images(os.path.join(split_dir, name)) if name in found else []
        if not files and name in found:
            raise DataError(f"class folder {os.path.join(split_dir, name)!r} holds no "
                            f"{'/'.join(SUFFIXES)} images")
        paths += files
        labels += [label] * len(files)
    problems = {p: why for p in paths if (why := header_problem(p, max_pixels))}
    if problems and not skip_unreadable:
        path, why = next(iter(problems.items()))
        raise DataError(f"{len(problems)} unreadable image file(s) in data.folder={folder!r} split {split!r}: "
                        f"{path!r} {why}; remove them or set data.skip_unreadable=True")
    skipped = set(problems)
    if skip_unreadable:
        skipped |= _undecodable([p for p in paths if p not in skipped])
    if skipped:
        logging.warning("data.folder=%r split %r: skipping %d unreadable image file(s), e.g. %r", folder, split,
                        len(skipped), min(skipped))
        kept = [(p, y) for p, y in zip(paths, labels) if p not in skipped]
        paths, labels = [p for p, _ in kept], [y for _, y in kept]
        for name in sorted(set(found) - {classes[y] for y in labels}):
            raise DataError(f"class folder {os.path.join(split_dir, name)!r} holds no readable images")
    order = np.random.RandomState(0).permutation(len(paths))  # classes interleaved; fixed for all versions
    return FolderSplit(tuple(paths[i] for i in order), tuple(labels[i] for i in order), classes,
                       tuple(sorted(skipped)))


def classes_of(data_cfg: Any) -> tuple[str, ...]:
    """The class names (the train split's class folders, sorted), checked against data.num_classes."""
    folder = data_cfg.get("folder") or ""
    if not folder or not os.path.isdir(folder):
        raise DataError(f"data.folder={folder!r} is not a directory (expected FOLDER/<split>/<class>/<image files>)")
    train_dir = os.path.join(folder, data_cfg.train_split)
    if not os.path.isdir(train_dir):
        raise DataError(f"data.folder={folder!r} has no train split folder {data_cfg.train_split!r}")
    classes = tuple(_class_dirs(train_dir))
    if not classes:
        raise DataError(f"train split folder {train_dir!r} has no class folders (expected <class>/<image files>)")
    if data_cfg.num_classes and len(classes) != data_cfg.num_classes:
        raise DataError(f"data.folder={folder!r} has {len(classes)} classes in split {data_cfg.train_split!r} "
                        f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}) but "
                        f"data.num_classes={data_cfg.num_classes}")
    return classes


def split_of(data_cfg: Any, split: str) -> FolderSplit:
    return scan(os.path.abspath(data_cfg.folder), split, classes_of(data_cfg),
                bool(data_cfg.get("skip_unreadable", False)), max_pixels_of(data_cfg))


def max_pixels_of(data_cfg: Any) -> int:
    """data.max_pixels (the largest width x height an image may declare), checked."""
    value = data_cfg.get("max_pixels", None) or DEFAULT_MAX_PIXELS
    if not isinstance(value, int) or value <= 0:
        raise DataError(f"data.max_pixels={value!r} must be a positive number of pixels")
    return value


def dataset_info(data_cfg: Any) -> dict[str, Any]:
    """Checks the train and test splits (everything but decoding, unless skip_unreadable) and their sizes."""
    splits = [s for s in (data_cfg.train_split, data_cfg.get("test_split")) if s]
    return {"num_examples": {s: len(split_of(data_cfg, s).paths) for s in splits}}


def source(data_cfg: Any, split: str) -> tf.data.Dataset:
    """This process's share of `split` as (path, label) pairs: equal counts on every process."""
    files = split_of(data_cfg, split)
    n, i = jax.process_count(), jax.process_index()
    usable = len(files.paths) // n * n
    paths, labels = files.paths[i:usable:n], files.labels[i:usable:n]
    if not paths:
        raise DataError(f"split {split!r} of data.folder={data_cfg.folder!r} has {len(files.paths)} images, "
                        f"fewer than the {n} processes")
    return tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, np.int32)))

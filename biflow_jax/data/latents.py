"""Encode an image dataset once through the frozen VAE, and read the latents back as a dataset.

`encode` (the command: `python -m biflow_jax.cli.encode_latents --config=configs/imagenet256_latent.py:b2
--out=DIR`) reads the image dataset `config.latent.source` (a TFDS name, an image folder
FOLDER/<split>/<class>/<files>, or the built-in digits), centre-crops every image the
ADM way (Dhariwal & Nichol, arXiv:2105.05233: halve with a box filter while the short
side is at least twice the target, bicubic resize of the short side, centre crop) and
encodes it and its horizontal flip with the VAE of `config.latent.vae_path`. Every
example stores the posterior mean and std of both views (unscaled, `latent.store_dtype`);
the training step draws its own latent from them (biflow_jax.latent_space).

Format: DIR/latents.json (shapes, dtype, counts, the VAE and source it came from) and
TFRecord shards DIR/<split>-<i>-of-<n>.tfrecord of `shard_size` examples in the source's
order, each record {mean, std: raw bytes of (2, h, w, c), label: int64}. Shard i is
encoded by process i mod process_count, written to a temporary name and renamed when
complete, so a killed run restarts where it stopped (finished shards are skipped) and
a rerun produces the same files. The input pipeline reads a split back in that fixed
order (`source`), so training order and resumption work exactly as for images.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from biflow_jax.data import image_folder
from biflow_jax.data.adm_resize import center_crop_adm
from biflow_jax.errors import DataError

META_FILE = "latents.json"
FORMAT = "biflow_jax latents v1"
STD_KEY = "image_std"  # the batch key of the std; biflow_jax.latent_space.STD_KEY names the same key
STORE_DTYPES = ("float16", "float32")


# ---------------------------------------------------------------------------
# Images in.

@functools.lru_cache(maxsize=8)
def _folder_files(folder: str, split: str, max_pixels: int) -> tuple[tuple[str, int], ...]:
    """Every file of FOLDER/<split>/<class>/, checked at start (before latents.json or a shard is written):
    each must be an image PIL can open whose header declares at most `max_pixels` pixels."""
    root = os.path.join(folder, split)
    if not os.path.isdir(root):
        raise DataError(f"image folder {folder!r} has no split directory {split!r} "
                        "(expected FOLDER/<split>/<class>/<image files>)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c))) if not f.startswith(".")]
    if not files:
        raise DataError(f"image folder {root!r} holds no images")
    for path, _ in files:
        why = image_problem(path, max_pixels)
        if why:
            raise DataError(f"image {path!r} in latent.source.folder {why}; remove it")
    return tuple(files)


def image_problem(path: str, max_pixels: int) -> str | None:
    """Why PIL cannot decode `path` within `max_pixels` (its header only is read), or None."""
    from PIL import Image

    key = "latent.source.max_pixels"
    if os.path.splitext(path)[1].lower() in image_folder.SIGNATURES:
        why = image_folder.header_problem(path, max_pixels, key)  # also finds truncated JPEG/PNG files
        if why:
            return why
    try:
        with Image.open(path) as im:
            dims = im.size
    except Image.DecompressionBombError:  # PIL's own, far higher cap: the size is in the message only
        return f"declares more pixels than PIL opens at all (far more than {key}={max_pixels})"
    except OSError as e:  # UnidentifiedImageError for text and other non-images
        return f"is not an image PIL can read ({e})"
    if dims[0] * dims[1] > max_pixels:
        return image_folder.pixels_problem(dims, max_pixels, key)
    return None


def tf_error_text(err: Exception) -> str:
    """A TensorFlow op error's own words, without the function-node and op names it wraps them in."""
    text = " ".join(getattr(err, "message", str(err)).split())
    text = re.sub(r"\{\{.*?\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:.*$", "", text) or type(err).__name__


def _tfds_builder(source: Any) -> Any:
    """A prepared TFDS dataset (this code never downloads), or a DataError saying what is missing."""
    import tensorflow_datasets as tfds

    data_dir = source.get("data_dir") or None
    try:
        builder = tfds.builder(source.name, data_dir=data_dir)
    except Exception as e:  # unknown name: tfds raises a registry error
        raise DataError(f"unknown dataset latent.source.name={source.name!r} ({type(e).__name__}); use 'digits', "
                        "'folder' or a TFDS name prepared in latent.source.data_dir") from e
    if not builder.is_prepared():
        raise DataError(f"dataset {source.name!r} is not prepared in data_dir={builder.data_dir!r}; prepare it "
                        "there first (tfds build / manual_dir)")
    return builder


class ImageSource:
    """One split of the source dataset: `len` examples, read by index range in a fixed order."""

    def __init__(self, source: Any, split: str):
        self.source, self.split, self.size = source, split, int(source.image_size)
        if source.name == "folder":
            self.files = _folder_files(os.path.abspath(source.folder), split, image_folder.max_pixels_of(source))
            self.count = len(self.files)
        elif source.name == "digits":
            from biflow_jax.data.digits import digits_arrays

            arrays = digits_arrays()
            if split not in arrays:
                raise DataError(f"the digits have splits ['test', 'train'], not {split!r}")
            self.arrays = arrays[split]
            self.count = len(self.arrays[1])
        else:
            self.builder = _tfds_builder(source)
            if split not in self.builder.info.splits:
                raise DataError(f"split {split!r} not in dataset {source.name!r}")
            self.count = int(self.builder.info.splits[split].num_examples)

    def read(self, start: int, end: int) -> Iterator[tuple[np.ndarray, int]]:
        """(uint8 (size, size, 3) ADM crop, label) for examples start..end-1."""
        from PIL import Image

        if self.source.name == "folder":
            for path, label in self.files[start:end]:
                try:
                    with Image.open(path) as im:
                        crop = center_crop_adm(im, self.size)
                except (OSError, Image.DecompressionBombError) as e:  # changed since the check at start
                    raise DataError(f"cannot read image {path!r}: {e}") from None
                yield crop, label
        elif self.source.name == "digits":
            images, labels = self.arrays
            for image, label in zip(images[start:end], labels[start:end]):
                yield center_crop_adm(Image.fromarray(image[..., 0]), self.size), int(label)
        else:
            import tensorflow_datasets as tfds

            label_key = self.source.get("label_key", "label")
            ds = self.builder.as_dataset(split=f"{self.split}[{start}:{end}]", shuffle_files=False,
                                         read_config=tfds.ReadConfig(interleave_cycle_length=1))
            for ex in tfds.as_numpy(ds):
                image = ex["image"]
                image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
                yield center_crop_adm(image, self.size), int(ex.get(label_key, -1))


# ---------------------------------------------------------------------------
# Encoding.

def make_encoder(vae_cfg: Any):
    """jitted (params, uint8 images (N, H, W, 3)) -> (mean, std), each (N, 2, h, w, c): image and its flip."""
    import jax
    import jax.numpy as jnp

    from biflow_jax.models.vae import AutoencoderKL

    model = AutoencoderKL(vae_cfg)

    @jax.jit
    def encode(params, images_uint8):
        x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
        both = jnp.concatenate([x, x[:, :, ::-1]])
        mean, std = model.apply({"params": params}, both, method=model.encode)
        n = x.shape[0]
        return jnp.stack([mean[:n], mean[n:]], 1), jnp.stack([std[:n], std[n:]], 1)

    return encode


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def _write_shard(path: str, mean: np.ndarray, std: np.ndarray, labels: np.ndarray) -> None:
    """All records of one shard, to a temporary file renamed into place (a shard is there whole or not at all)."""
    import tensorflow as tf

    tmp = _temporary_name(path)
    with tf.io.TFRecordWriter(tmp) as writer:
        for m, s, y in zip(mean, std, labels):
            feature = {"mean": tf.train.Feature(bytes_list=tf.train.BytesList(value=[m.tobytes()])),
                       "std": tf.train.Feature(bytes_list=tf.train.BytesList(value=[s.tobytes()])),
                       "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(y)]))}
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString(deterministic=True))  # map order fixed: identical bytes
    os.replace(tmp, path)


def _write_json(path: str, content: dict) -> None:
    tmp = _temporary_name(path)
    with open(tmp, "w") as f:
        json.dump(content, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _encode_range(encoder: Any, params: Any, examples: Iterator[tuple[np.ndarray, int]], batch: int, dtype: str,
                  bar: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, labels) of an example stream, encoded `batch` images at a time."""
    means, stds, labels, images = [], [], [], []

    def flush():
        m, s = encoder(params, np.stack(images))
        means.append(np.asarray(m).astype(dtype))
        stds.append(np.asarray(s).astype(dtype))
        bar.update(len(images))
        images.clear()

    for image, label in examples:
        images.append(image)
        labels.append(label)
        if len(images) == batch:
            flush()
    if images:
        flush()
    return np.concatenate(means), np.concatenate(stds), np.asarray(labels, np.int64)


TEMPORARY_TAG = ".biflow-partial-"
OWN_FILE = re.compile(r"(?:[\w.]+-\d{5}-of-\d{5}\.tfrecord|" + re.escape(META_FILE) + ")")


def _temporary_name(path: str) -> str:
    """PATH.biflow-partial-HOST-PID: where a file is written before its rename (named for its writer)."""
    return f"{path}{TEMPORARY_TAG}{socket.gethostname()}-{os.getpid()}"


def _remove_stale_partials(out: str) -> None:
    """Delete half-written files of this encoder (a shard or latents.json + TEMPORARY_TAG + HOST-PID) whose
    writer was on this host and is no longer alive (a killed run); anything else in `out` is never touched."""
    for name in os.listdir(out):
        stem, _, writer = name.rpartition(TEMPORARY_TAG)
        host, _, pid = writer.rpartition("-")
        if not OWN_FILE.fullmatch(stem) or host != socket.gethostname() or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            os.remove(os.path.join(out, name))
        except PermissionError:
            pass  # alive, another user's


def plan(config: Any, vae_cfg: Any, splits: list[str]) -> dict[str, Any]:
    """The metadata of the dataset `encode` writes (everything but the shards)."""
    latent, source = config.latent, config.latent.source
    side = source.image_size // vae_cfg.downsample_factor
    shard_size = int(latent.get("shard_size", 10_000))
    counts = {split: ImageSource(source, split).count for split in splits}
    return {
        "format": FORMAT,
        "latent_shape": [side, side, vae_cfg.latent_channels],
        "views": ["image", "horizontal_flip"],
        "dtype": latent.get("store_dtype", "float16"),
        "shard_size": shard_size,
        "splits": {s: {"num_examples": n, "num_shards": max(1, -(-n // shard_size))} for s, n in counts.items()},
        "source": {k: source.get(k) for k in ("name", "folder", "data_dir", "image_size", "label_key")},
        "crop": "adm_center_crop",
        "vae": {"path": os.path.abspath(os.path.expanduser(latent.vae_path)),
                "block_out_channels": list(vae_cfg.block_out_channels),
                "latent_channels": vae_cfg.latent_channels, "scaling_factor": vae_cfg.scaling_factor,
                "shift_factor": vae_cfg.shift_factor, "dtype": vae_cfg.dtype},
    }


def encode(config: Any, out: str, splits: list[str] | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Encode `config.latent.source` into `out` (this process's shards); returns the metadata.

    Safe to rerun after a kill: finished shards are kept, the others are (re)encoded.
    """
    import jax

    from biflow_jax import latent_space
    from biflow_jax.interop.vae_weights import load_vae

    latent = config.latent
    vae_path = latent_space.check_vae_path(latent)  # before anything is written
    dtype = latent.get("store_dtype", "float16")
    if dtype not in STORE_DTYPES:
        raise DataError(f"latent.store_dtype={dtype!r} must be one of {STORE_DTYPES}")
    source = latent.source
    splits = splits or [s for s in (source.train_split, source.test_split) if s]
    vae_cfg, params = load_vae(vae_path, dtype=latent.get("vae_dtype", "float32"))
    if source.image_size % vae_cfg.downsample_factor:
        raise DataError(f"latent.source.image_size={source.image_size} is not a multiple of the VAE's "
                        f"downsampling factor {vae_cfg.downsample_factor}")
    meta = plan(config, vae_cfg, splits)
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, META_FILE)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise DataError(f"{out!r} holds latents of another source, VAE or layout (differs in {diff}); "
                            "use another --out or delete it")
    else:
        _write_json(meta_path, meta)

    _remove_stale_partials(out)
    params = jax.device_put(params)
    encoder = make_encoder(vae_cfg)
    batch = int(latent.get("encode_batch", 64))
    process, processes = jax.process_index(), jax.process_count()
    todo = []
    for split in splits:
        info = meta["splits"][split]
        for i in range(process, info["num_shards"], processes):
            path = os.path.join(out, shard_name(split, i, info["num_shards"]))
            if not os.path.exists(path):
                todo.append((split, i, path))
    total = sum(min(meta["shard_size"], meta["splits"][s]["num_examples"] - i * meta["shard_size"])
                for s, i, _ in todo)
    show = sys.stderr.isatty() if progress is None else progress
    from tqdm import tqdm

    with tqdm(total=total, desc="encoding latents", unit="img", disable=not show) as bar:
        for split, i, path in todo:
            reader = ImageSource(source, split)
            start = i * meta["shard_size"]
            end = min(start + meta["shard_size"], reader.count)
            mean, std, labels = _encode_range(encoder, params, reader.read(start, end), batch, dtype, bar)
            _write_shard(path, mean, std, labels)
    return meta


# ---------------------------------------------------------------------------
# Reading back (the input pipeline's `data.name == 'latents'`).

def read_meta(folder: str) -> dict[str, Any]:
    path = os.path.join(folder or "", META_FILE)
    if not folder or not os.path.isfile(path):
        raise DataError(f"data.folder={folder!r} holds no {META_FILE}: encode the images first with "
                        "`python -m biflow_jax.cli.encode_latents --config=... --out=DIR` and set data.folder=DIR")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise DataError(f"{path!r} is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path!r} is not a {FORMAT!r} file")
    check_meta(meta, path)
    return meta


def check_meta(meta: dict, path: str) -> None:
    """DataError naming the field of latents.json that the reader cannot use (a dtype the shards were
    not written in would misread every record)."""
    if meta.get("dtype") not in STORE_DTYPES:
        raise DataError(f"{path!r}: dtype {meta.get('dtype')!r} is not one of {STORE_DTYPES}")
    shape = meta.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise DataError(f"{path!r}: latent_shape {shape!r} is not three positive integers")
    if not isinstance(meta.get("shard_size"), int) or meta["shard_size"] <= 0:
        raise DataError(f"{path!r}: shard_size {meta.get('shard_size')!r} is not a positive integer")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("num_examples"), int) and isinstance(v.get("num_shards"), int)
            for v in splits.values()):
        raise DataError(f"{path!r}: splits {splits!r} is not {{split: {{num_examples, num_shards}}}}")


def damaged_shard(folder: str, split: str) -> str:
    """'SHARD (REASON)' for the first shard of `split` whose records fail their checksums, read whole;
    called once a read has failed (TFRecord errors do not say which file)."""
    import tensorflow as tf

    meta = read_meta(folder)
    for path in shard_paths(folder, meta, split):
        try:
            for _ in tf.data.TFRecordDataset(path).as_numpy_iterator():
                pass
        except tf.errors.DataLossError as e:
            return f"{path} ({tf_error_text(e)})"
    return f"a shard of split {split!r} in {folder!r}"


def shard_paths(folder: str, meta: dict, split: str) -> list[str]:
    """The split's shard files in order; DataError if the split is unknown or not completely encoded."""
    if split not in meta["splits"]:
        raise DataError(f"split {split!r} is not in the latents of {folder!r} (has {sorted(meta['splits'])})")
    count = meta["splits"][split]["num_shards"]
    paths = [os.path.join(folder, shard_name(split, i, count)) for i in range(count)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DataError(f"the latents in {folder!r} are incomplete: {len(missing)} of {count} {split!r} shards "
                        "missing; rerun `python -m biflow_jax.cli.encode_latents` to finish them")
    return paths


def dataset_info(data_cfg: Any) -> dict[str, Any]:
    meta = read_meta(data_cfg.folder)
    for split in meta["splits"]:
        shard_paths(data_cfg.folder, meta, split)
    return {"num_examples": {s: v["num_examples"] for s, v in meta["splits"].items()}}


def source(data_cfg: Any, split: str, process_index: int | None = None, process_count: int | None = None):
    """This process's contiguous share of `split` (whole shares, remainder dropped), in the stored order,
    as tf.data ({'mean', 'std': float32 (2, h, w, c)}, int32 label) pairs with a known cardinality."""
    import jax
    import tensorflow as tf

    meta = read_meta(data_cfg.folder)
    paths = shard_paths(data_cfg.folder, meta, split)
    shape, dtype = list(meta["latent_shape"]), tf.as_dtype(meta["dtype"])
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    per = meta["splits"][split]["num_examples"] // count
    start, size = index * per, meta["shard_size"]
    first, last = start // size, max(start, start + per - 1) // size
    ds = tf.data.TFRecordDataset(paths[first:last + 1]).skip(start - first * size).take(per)
    spec = {"mean": tf.io.FixedLenFeature([], tf.string), "std": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64)}

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        views = {k: tf.cast(tf.reshape(tf.io.decode_raw(ex[k], dtype), [2] + shape), tf.float32)
                 for k in ("mean", "std")}
        return views, tf.cast(ex["label"], tf.int32)

    return ds.map(parse).apply(tf.data.experimental.assert_cardinality(per))


def example(views: Any, label: Any, flip: Any) -> dict[str, Any]:
    """One training/eval example from a record: the flipped view when `flip`; `image` holds the posterior mean."""
    import tensorflow as tf

    view = tf.cast(flip, tf.int32)
    return {"image": views["mean"][view], STD_KEY: views["std"][view], "label": label}

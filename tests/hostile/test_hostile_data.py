"""Hostile data: images whose header declares a huge picture, a real 1x1 image, text among the images of
the latent encoder's source, damaged latent shards and metadata, and files beside the encoder's output."""

import json
import os
import socket
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from helpers.paths import REPO
from hostile_files import flip_byte, png_declaring, write_folder
from PIL import Image

from biflow_jax import config_files
from biflow_jax.data import image_folder, input_pipeline, latents
from biflow_jax.errors import DataError
from configs import common


def test_a_real_1x1_png_is_an_image():
    """Case: a real 1x1 PNG was reported as 'could not be decoded' (1x1 was the failure marker)."""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"one_pixel_{os.getpid()}.png")
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(path)
    try:
        image, readable = image_folder.decode(tf.constant(path), 3)
        assert bool(readable) and image.shape == (1, 1, 3) and int(image[0, 0, 0]) == 200
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n not an image IEND\xaeB`\x82")
        image, readable = image_folder.decode(tf.constant(path), 3)
        assert not bool(readable) and image.shape == (1, 1, 3)
    finally:
        os.remove(path)


def test_an_image_declaring_too_many_pixels_is_refused_from_its_header(tmp_path):
    """Case: a 140 KB PNG declaring 12000x12000 pixels was decoded (7.5 GB peak); nothing capped the count."""
    root = write_folder(str(tmp_path / "images"), {"train": 2, "test": 1})
    bomb = png_declaring(os.path.join(root, "train", "a", "bomb.png"), 12000, 12000)
    assert os.path.getsize(bomb) < 1000
    data = common.data(name="folder", folder=root, num_classes=2, channels=1)
    with pytest.raises(DataError, match=f"{bomb}' declares 12000x12000 pixels, more than data.max_pixels=25165824"):
        input_pipeline.dataset_info(data)
    data.max_pixels = 12000 * 12000  # a real image that large: the user raises the cap
    image_folder.scan.cache_clear()
    assert image_folder.header_problem(bomb, data.max_pixels) is None
    jpeg = os.path.join(root, "train", "b", "wide.jpg")
    Image.fromarray(np.zeros((3, 40, 3), np.uint8)).save(jpeg)  # JPEG: the size from its frame header
    assert image_folder.header_problem(jpeg, 119) == image_folder.pixels_problem((40, 3), 119)
    assert image_folder.header_problem(jpeg, 120) is None


@pytest.fixture(scope="module")
def latent_config(tmp_path_factory):
    """configs/imagenet256_latent.py:smoke with a zero-weight tiny VAE (nothing is encoded in these tests)."""
    from biflow_jax.interop.state_dicts import nest
    from biflow_jax.interop.vae_weights import abstract_params, save_vae
    from biflow_jax.models.vae import vae_config

    root = tmp_path_factory.mktemp("hostile_latents")
    cfg = vae_config("tiny")
    save_vae(str(root / "vae"), cfg, nest({k: np.zeros(s.shape, np.float32) for k, s in abstract_params(cfg).items()}))
    config = config_files.load(f"{REPO}/configs/imagenet256_latent.py:smoke")
    return config_files.apply_overrides(config, [f"latent.vae_path={root / 'vae'}"]), root


@pytest.mark.parametrize("bad", ["text_file", "bomb_14000", "bomb_14000_any_suffix", "declares_12000"])
def test_a_bad_file_in_the_latent_source_is_one_line_before_anything_is_written(latent_config, tmp_path, bad):
    """Cases: a 14000x14000 PNG in the latents source gave a DecompressionBombError traceback; a text file
    there was reported only after latents.json and a shard were written."""
    config, _ = latent_config
    images = write_folder(str(tmp_path / "images"), {"train": 2, "test": 1}, size=16)
    path = os.path.join(images, "train", "b", {"text_file": "notes.txt", "bomb_14000_any_suffix": "big.img"}.get(
        bad, "big.png"))
    if bad == "text_file":
        with open(path, "w") as f:
            f.write("not an image\n")
    else:
        png_declaring(path, *((12000, 12000) if bad == "declares_12000" else (14000, 14000)))
    config = config_files.apply_overrides(config.copy_and_resolve_references(), [f"latent.source.folder={images}"])
    out = str(tmp_path / "latents")
    why = {"text_file": "is not an image PIL can read", "bomb_14000": "declares 14000x14000 pixels, more than",
           "bomb_14000_any_suffix": "declares more pixels than PIL opens at all",  # PIL's DecompressionBombError
           "declares_12000": "declares 12000x12000 pixels, more than latent.source.max_pixels=25165824"}[bad]
    with pytest.raises(DataError, match=f"image '{path}' in latent.source.folder {why}") as err:
        latents.encode(config, out)
    assert "\n" not in str(err.value)
    assert not os.path.exists(out) or os.listdir(out) == []


def write_latents(folder, dtype="float16"):
    """A hand-made latents folder: 8 train examples in 2 shards of 4, latents 2x2x4."""
    os.makedirs(folder)
    meta = {"format": latents.FORMAT, "latent_shape": [2, 2, 4], "dtype": dtype, "shard_size": 4,
            "splits": {"train": {"num_examples": 8, "num_shards": 2}}}
    with open(os.path.join(folder, latents.META_FILE), "w") as f:
        json.dump(meta, f)
    rng = np.random.default_rng(0)
    for i in range(2):
        values = rng.normal(size=(4, 2, 2, 2, 4)).astype(np.float16)
        latents._write_shard(os.path.join(folder, latents.shard_name("train", i, 2)), values, np.abs(values),
                             np.arange(4) % 2)
    return common.data(name="latents", folder=folder, num_classes=2, image_size=2, channels=4, test_split="")


def test_a_flipped_byte_in_a_latent_shard_names_the_shard(tmp_path):
    """Case: a latents shard with one flipped byte gave 'DataLossError: corrupted record at 12', naming no file."""
    data = write_latents(str(tmp_path / "latents"))
    assert sum(int(b["mask"].sum()) for b in input_pipeline.eval_batches(data, 4, "train")) == 8
    shard = os.path.join(data.folder, latents.shard_name("train", 1, 2))
    flip_byte(shard, 40)
    with pytest.raises(DataError, match=f"^damaged data: {shard} \\(corrupted record at 12\\); re-create") as err:
        for _ in input_pipeline.eval_batches(data, 4, "train"):
            pass
    assert "\n" not in str(err.value)


def test_latents_json_with_another_dtype_is_one_line(tmp_path):
    """Case: latents.json with dtype float64 gave an InvalidArgumentError traceback."""
    data = write_latents(str(tmp_path / "latents"), dtype="float64")
    path = os.path.join(data.folder, latents.META_FILE)
    with pytest.raises(DataError, match=f"{path}': dtype 'float64' is not one of"):
        input_pipeline.dataset_info(data)


def test_the_encoder_deletes_only_its_own_dead_partial_files(tmp_path):
    """Case: the latent encoder deleted any *.tmp-<pid> file of a dead pid in --out, a user's file included."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    here, tag = socket.gethostname(), latents.TEMPORARY_TAG
    mine = f"train-00000-of-00002.tfrecord{tag}{here}-{dead.pid}"
    kept = [f"notes.txt.tmp-{dead.pid}", f"train-00000-of-00002.tfrecord.tmp-{dead.pid}",  # a user's / old names
            f"train-00001-of-00002.tfrecord{tag}otherhost-{dead.pid}",  # another host's writer: cannot be checked
            f"train-00001-of-00002.tfrecord{tag}{here}-{os.getpid()}",  # a live writer
            f"mydata{tag}{here}-{dead.pid}"]  # not a file this encoder writes
    for name in [mine, *kept]:
        (out / name).write_bytes(b"x")
    latents._remove_stale_partials(str(out))
    assert sorted(os.listdir(out)) == sorted(kept)

"""Latent datasets (biflow_jax.data.latents): what is read back is what was written, the stored
flip is the encoding of the flipped image, and a SIGKILL mid-encoding then a rerun gives the
same files as an uninterrupted run."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers.paths import REPO
from latent_setup import make_images, make_vae, smoke_config
from PIL import Image

from biflow_jax.data import input_pipeline, latents
from biflow_jax.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("latents"))
    images, vae = make_images(root), make_vae(root)
    config = smoke_config(root, images, vae)
    written = {}
    original = latents._write_shard

    def recording(path, mean, std, labels):
        written[os.path.basename(path)] = (mean.copy(), std.copy(), labels.copy())
        original(path, mean, std, labels)

    latents._write_shard = recording
    try:
        meta = latents.encode(config, config.data.folder)
    finally:
        latents._write_shard = original
    return root, config, meta, written


def _files(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if name.endswith((".tfrecord", ".json"))}


def test_read_back_equals_written(setup):
    _, config, meta, written = setup
    assert meta["splits"] == {"train": {"num_examples": 6, "num_shards": 2}, "test": {"num_examples": 2,
                                                                                  "num_shards": 1}}
    assert meta["latent_shape"] == [8, 8, 4]
    for split in ("train", "test"):
        n = meta["splits"][split]["num_shards"]
        mean = np.concatenate([written[latents.shard_name(split, i, n)][0] for i in range(n)])
        std = np.concatenate([written[latents.shard_name(split, i, n)][1] for i in range(n)])
        labels = np.concatenate([written[latents.shard_name(split, i, n)][2] for i in range(n)])
        read = list(latents.source(config.data, split, 0, 1).as_numpy_iterator())
        assert len(read) == len(labels) == meta["splits"][split]["num_examples"]
        np.testing.assert_array_equal(np.stack([r[0]["mean"] for r in read]), mean)
        np.testing.assert_array_equal(np.stack([r[0]["std"] for r in read]), std)
        np.testing.assert_array_equal([r[1] for r in read], labels)
        assert sorted(set(labels.tolist())) == [0, 1] and np.all(std > 0)
    # Two processes each read a contiguous half, together the whole split in order.
    halves = [list(latents.source(config.data, "train", p, 2).as_numpy_iterator()) for p in (0, 1)]
    assert [r[1] for r in halves[0] + halves[1]] == written["train-00000-of-00002.tfrecord"][2].tolist() + \
        written["train-00001-of-00002.tfrecord"][2].tolist()
    # The input pipeline: eval batches hold view 0 (unflipped) means and stds, in order.
    batch = next(input_pipeline.eval_batches(config.data, 2, "test"))
    np.testing.assert_array_equal(batch["image"], written["test-00000-of-00001.tfrecord"][0][:, 0])
    np.testing.assert_array_equal(batch["image_std"], written["test-00000-of-00001.tfrecord"][1][:, 0])


def test_train_batches_pick_stored_views_and_resume_in_order(setup):
    _, config, _, written = setup
    stored = np.concatenate([written[f"train-0000{i}-of-00002.tfrecord"][0] for i in range(2)])
    stream = input_pipeline.train_batches(config.data, 2, seed=3)
    batches = [next(stream) for _ in range(6)]
    views = set()
    for b in batches:
        for mean in b["image"]:
            hits = [(i, v) for i in range(len(stored)) for v in (0, 1) if np.array_equal(stored[i, v], mean)]
            assert len(hits) == 1
            views.add(hits[0][1])
    assert views == {0, 1}  # random_flip picks both stored views
    resumed = next(input_pipeline.train_batches(config.data, 2, seed=3, position=4))
    np.testing.assert_array_equal(resumed["image"], batches[4]["image"])


def test_flipped_view_is_the_encoding_of_the_flipped_image(setup):
    from biflow_jax.interop.vae_weights import load_vae
    from biflow_jax.models.vae import AutoencoderKL

    _, config, _, written = setup
    cfg, params = load_vae(config.latent.vae_path)
    model = AutoencoderKL(cfg)
    folder = os.path.join(config.latent.source.folder, "test")
    files = [os.path.join(folder, c, f) for c in sorted(os.listdir(folder)) for f in sorted(os.listdir(
        os.path.join(folder, c)))]
    crops = np.stack([latents.center_crop_adm(Image.open(f), 16) for f in files])
    assert crops.shape == (2, 16, 16, 3)
    mean, std, _ = written["test-00000-of-00001.tfrecord"]
    for view, images in ((0, crops), (1, crops[:, :, ::-1])):
        for k in range(len(images)):  # one image at a time: not the batch the encoder saw
            x = jax.numpy.asarray(images[k:k + 1], jax.numpy.float32) / 127.5 - 1.0
            m, s = model.apply({"params": params}, x, method=model.encode)
            np.testing.assert_allclose(mean[k, view], np.asarray(m)[0], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(std[k, view], np.asarray(s)[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(mean[:, 0], mean[:, 1])  # the flip is a different latent


def test_adm_center_crop():
    image = Image.fromarray(np.arange(100 * 60 * 3, dtype=np.uint32).reshape(100, 60, 3).astype(np.uint8))
    assert latents.center_crop_adm(image, 16).shape == (16, 16, 3)
    big = Image.fromarray(np.full((300, 200, 3), 7, np.uint8))  # box-halved twice, then bicubic: constant stays
    np.testing.assert_array_equal(latents.center_crop_adm(big, 32), np.full((32, 32, 3), 7, np.uint8))


KILL_AFTER_FIRST_SHARD = """
import sys, time
sys.argv = sys.argv[:1] + {args!r}
from biflow_jax.data import latents
original = latents._write_shard
def slow(*a):
    original(*a)
    print("shard written", flush=True)
    time.sleep(60)  # killed here
latents._write_shard = slow
from biflow_jax.cli import encode_latents
encode_latents.run()
"""


def test_sigkill_then_rerun_equals_uninterrupted(setup, tmp_path):
    root, config, _, _ = setup
    out = str(tmp_path / "killed")
    args = ["--config=" + f"{REPO}/configs/imagenet256_latent.py:smoke", f"--out={out}",
            f"--config.latent.source.folder={config.latent.source.folder}",
            f"--config.latent.vae_path={config.latent.vae_path}"]
    child = subprocess.Popen([sys.executable, "-c", KILL_AFTER_FIRST_SHARD.format(args=args)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "shard written"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    shards = [f for f in os.listdir(out) if f.endswith(".tfrecord")]
    assert len(shards) == 1  # killed after its first of three shards
    with pytest.raises(DataError, match="incomplete: 1 of 1 'test' shards missing"):
        latents.dataset_info(_with_folder(config, out).data)
    partial = f"train-00001-of-00002.tfrecord{latents.TEMPORARY_TAG}{socket.gethostname()}-{child.pid}"
    with open(os.path.join(out, partial), "wb") as f:
        f.write(b"half a shard")  # what a kill during a shard write leaves (the writer is dead)
    before = os.path.getmtime(os.path.join(out, shards[0]))
    time.sleep(0.01)
    latents.encode(config, out)  # the rerun: finishes the other shards, keeps the finished one
    assert os.path.getmtime(os.path.join(out, shards[0])) == before
    assert _files(out) == _files(config.data.folder)
    assert not [f for f in os.listdir(out) if latents.TEMPORARY_TAG in f]  # the killed writer's partial shard is gone


def _with_folder(config, folder):
    c = config.copy_and_resolve_references()
    c.data.folder = folder
    return c


def test_missing_vae_path_stops_before_writing(setup, tmp_path):
    _, config, _, _ = setup
    c = config.copy_and_resolve_references()
    c.latent.vae_path = ""
    out = str(tmp_path / "never")
    with pytest.raises(ConfigError, match="diffusers AutoencoderKL directory such as one saved from "
                                          "stabilityai/sd-vae-ft-ema"):
        latents.encode(c, out)
    c.latent.vae_path = str(tmp_path / "no_such_vae")
    with pytest.raises(ConfigError, match="has no config.json"):
        latents.encode(c, out)
    assert not os.path.exists(out)

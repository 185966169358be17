"""Image-folder data: a generated FOLDER/<split>/<class> tree of mixed RGB/grayscale JPEG/PNG files trains
and evaluates, splits into equal disjoint per-process shards, and every bad folder or label stops at start
with one line naming the problem."""

import os
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, quick_config
from PIL import Image

from biflow_jax import evaluators, sharding, trainer
from biflow_jax.data import image_folder, input_pipeline
from biflow_jax.errors import DataError
from biflow_jax.models import registry
from biflow_jax.objectives import flow

CLASSES = ("cat", "dog", "wild")


def write_folder(root, per_class=None):
    """RGB JPEGs, grayscale PNGs and RGBA PNGs of assorted sizes, per split and class."""
    rng = np.random.default_rng(0)
    for split, n in (per_class or {"train": 8, "test": 3}).items():
        for c, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                h, w = 9 + i % 4, 12 - i % 3
                base = rng.integers(0, 64, (h, w)) + 80 * c  # class-dependent brightness
                if i % 3 == 0:
                    Image.fromarray(np.stack([base] * 3, -1).astype(np.uint8)).save(f"{folder}/{i}.jpg")
                elif i % 3 == 1:
                    Image.fromarray(base.astype(np.uint8)).save(f"{folder}/{i}.png")
                else:
                    rgba = np.stack([base, base, base, np.full_like(base, 255)], -1).astype(np.uint8)
                    Image.fromarray(rgba).save(f"{folder}/{i}.PNG")
    return str(root)


def folder_config(root, steps=2, channels=1):
    config = quick_config("flow", steps)
    config.data.update(name="folder", folder=root, num_classes=len(CLASSES), channels=channels, image_size=8)
    config.model.update(num_classes=len(CLASSES), in_channels=channels, num_blocks=2, layers_per_block=1,
                        channels=32, head_dim=32)
    config.train.update(batch_size=8, eval_batch_size=8, checkpoint_every=steps, log_every=steps)
    config.optim.update(warmup_steps=1)
    return config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))


def as_processes(n, fn):
    """fn() as seen by each of n processes (process index and count mocked, as in multiprocess_worker)."""
    out = []
    for p in range(n):
        with mock.patch.object(jax, "process_index", lambda *a, p=p: p), \
                mock.patch.object(jax, "process_count", lambda *a: n):
            out.append(fn())
    return out


def test_folder_data_trains_and_evaluates(folder, tmp_path):
    config = folder_config(folder)
    assert input_pipeline.dataset_info(config.data)["num_examples"] == {"train": 24, "test": 9}
    model = registry.build_flow(config.model)
    objective = flow.make(config, model)
    mesh = sharding.make_mesh()
    evals = evaluators.for_flow_stage(config, model, objective.flow_params, mesh)
    results = trainer.run(objective, evals, config, str(tmp_path / "run"), "flow", mesh)
    assert np.isfinite(results["test_bpd"]) and 0 < results["test_bpd"] < 20, results


def test_two_processes_read_equal_disjoint_shards_in_a_fixed_order(folder):
    config = folder_config(folder)
    whole = image_folder.split_of(config.data, "train").paths
    shards = as_processes(2, lambda: [p.decode() for p, _ in image_folder.source(config.data, "train")
                                      .as_numpy_iterator()])
    assert len(shards[0]) == len(shards[1]) == len(whole) // 2
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(whole)
    assert image_folder.split_of(config.data, "train").paths == whole  # the same order every time
    # Each process trains on local batches of half the global batch and evaluates the same number of batches.
    train = as_processes(2, lambda: next(input_pipeline.train_batches(config.data, 8, seed=0)))
    assert [b["image"].shape for b in train] == [(4, 8, 8, 1)] * 2 and sorted(train[0]) == ["image", "label"]
    evals = as_processes(2, lambda: [b["mask"].sum() for b in input_pipeline.eval_batches(config.data, 4)])
    assert len(evals[0]) == len(evals[1]) and sum(evals[0]) + sum(evals[1]) == 8  # 9 test images, 2 processes


def test_rgb_and_grayscale_files_convert_to_the_configured_channels(folder):
    gray_png = os.path.join(folder, "train", "dog", "1.png")
    rgb_jpg = os.path.join(folder, "train", "dog", "0.jpg")
    image, readable = image_folder.decode(tf.constant(gray_png), 3)
    image = image.numpy()
    assert bool(readable) and image.shape[-1] == 3 and (image[..., 0] == image[..., 2]).all()
    gray, _ = image_folder.decode(tf.constant(rgb_jpg), 1)
    assert gray.shape[-1] == 1
    for channels in (1, 3):
        batch = next(input_pipeline.train_batches(folder_config(folder, channels=channels).data, 8, seed=0))
        assert batch["image"].shape == (8, 8, 8, channels) and batch["image"].dtype == np.uint8


def test_class_count_mismatch_exits_2_before_anything_is_written(folder, tmp_path):
    workdir = tmp_path / "never"
    out = subprocess.run([sys.executable, "-m", "biflow_jax.main", "--config=configs/digits.py:quick",
                          f"--workdir={workdir}", "--config.stage=flow", "--config.data.name=folder",
                          f"--config.data.folder={folder}", "--config.data.num_classes=5",
                          "--config.model.num_classes=5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: data.folder={folder!r} has 3 classes in split 'train' (cat, dog, wild) but "
                      "data.num_classes=5"], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not workdir.exists()


def test_bad_folders_stop_at_start_naming_the_problem(tmp_path):
    root = write_folder(tmp_path / "bad", {"train": 3, "test": 1})
    data = folder_config(root).data
    os.makedirs(os.path.join(root, "train", "empty_class"))
    with pytest.raises(DataError, match="has 4 classes"):
        input_pipeline.dataset_info(data)
    data.num_classes = 4
    with pytest.raises(DataError, match="empty_class' holds no .jpg/.jpeg/.png images"):
        input_pipeline.dataset_info(data)
    os.rmdir(os.path.join(root, "train", "empty_class"))
    data.num_classes = 3
    not_an_image = os.path.join(root, "train", "cat", "notes.jpg")
    with open(not_an_image, "w") as f:
        f.write("not an image")
    truncated = os.path.join(root, "train", "dog", "0.jpg")
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    with pytest.raises(DataError, match=r"2 unreadable image file\(s\) .*(notes|0)\.jpg"):
        input_pipeline.dataset_info(data)
    data.skip_unreadable = True  # left out before the order is fixed, with a count
    assert input_pipeline.dataset_info(data)["num_examples"]["train"] == 3 * 3 - 1
    assert set(image_folder.split_of(data, "train").skipped) == {not_an_image, truncated}


def test_a_file_that_fails_to_decode_is_named(tmp_path):
    root = write_folder(tmp_path / "corrupt", {"train": 3, "test": 1})
    path = os.path.join(root, "train", "wild", "0.jpg")
    with open(path, "r+b") as f:  # keeps the JPEG signature and end marker, breaks the Huffman tables
        f.seek(100)
        f.write(b"\xff" * 64)
    data = folder_config(root).data
    input_pipeline.dataset_info(data)  # the cheap check at start cannot see it
    with pytest.raises(DataError, match=f"{path}' in data.folder could not be decoded"):
        batches = input_pipeline.train_batches(data, 8, seed=0)
        for _ in range(3):
            next(batches)


def test_labels_outside_num_classes_are_an_error_not_clipped():
    config = quick_config("flow", 2)
    config.data.num_classes = 5
    with pytest.raises(DataError, match="has 10 classes but data.num_classes=5"):
        input_pipeline.dataset_info(config.data)
    with pytest.raises(DataError, match=r"label [5-9] in dataset 'digits' is outside \[0, 5\)"):
        batches = input_pipeline.train_batches(config.data, 16, seed=0)
        for _ in range(3):
            next(batches)
    batch = {"image": np.zeros((2, 8, 8, 1), np.uint8), "label": np.array([1, -3]), "mask": np.array([True, True])}
    with pytest.raises(DataError, match=r"label -3 .* outside \[0, 5\)"):
        next(input_pipeline.checked_batches(iter([batch]), config.data))
    batch["mask"][1] = False  # padding is not data
    assert next(input_pipeline.checked_batches(iter([batch]), config.data)) is batch

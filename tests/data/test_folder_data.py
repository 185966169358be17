"""Image-folder data: a generated FOLDER/<split>/<class> tree of mixed RGB/grayscale JPEG/PNG files trains
and evaluates, splits into equal disjoint per-process shards, and every bad folder or label stops at start
with one line naming the problem."""

import json
import os
import socket
import subprocess
import sys
import time
from unittest import mock

import jax
import multiprocess_worker as worker
import numpy as np
import pytest
import tensorflow as tf
from helpers.compile_flags import host_devices
from helpers.configs import quick_config
from helpers.paths import REPO
from PIL import Image

from biflow_jax import evaluators, runs, sharding, trainer
from biflow_jax.data import image_folder, input_pipeline
from biflow_jax.errors import DataError
from biflow_jax.evaluators import bpd
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


TIMEOUT = 300  # seconds for the pair of processes; both are killed when one fails or time runs out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_process_pair(root) -> list[dict]:
    """tests/multiprocess_worker.py `folder` in 2 gloo-connected processes; each one's JSON result."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=host_devices(1))
    port, logs, procs = str(free_port()), [], []
    try:
        for i in range(worker.PROCESSES):
            logs.append(open(os.path.join(root, f"process_{i}.log"), "w+"))
            procs.append(subprocess.Popen([sys.executable, worker.__file__, "folder", port, str(i), str(root)],
                                          cwd=REPO, env=env, text=True, stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # a failed process: its peer would wait for it until the deadline
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for p, log in zip(procs, logs, strict=True):
        log.seek(0)
        outputs.append(log.read())
        log.close()
        assert p.returncode == 0, outputs[-1][-4000:]
    return [json.loads([line for line in out.splitlines() if line.startswith(worker.RESULT)][-1]
                       [len(worker.RESULT):]) for out in outputs]


def test_two_gloo_processes_train_and_evaluate_folder_data(tmp_path):
    """Real processes, not a patched index: each reads its own disjoint half of both splits, the run
    saves and verifies its final step, and the test bits/dim both processes report is the mean over
    the whole test split, recomputed here in one process from the saved EMA params."""
    write_folder(tmp_path / "images", {"train": 8, "test": 4})  # 24 and 12 images: even halves
    out = sorted(run_process_pair(tmp_path), key=lambda r: r["process"])
    config = worker.folder_config(str(tmp_path / "images"))
    for split in ("train", "test"):
        whole = image_folder.split_of(config.data, split).paths
        halves = [set(r["shards"][split]) for r in out]
        assert len(halves[0]) == len(halves[1]) == len(whole) // 2 and not halves[0] & halves[1], split
        assert halves[0] | halves[1] == set(whole), split
    assert [r["process"] for r in out] == [0, 1]
    reported = [r["results"]["test_bpd"] for r in out]
    assert reported[0] == reported[1] and np.isfinite(reported[0]), reported
    run = runs.load_flow(str(tmp_path / "run"))  # EMA params, as the evaluator used them
    assert run.step == worker.FOLDER_STEPS
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [str(worker.FOLDER_STEPS)]  # step 1 pruned
    # The 2-process global eval batches (process 0's local batch, then process 1's), built in one process.
    mesh = sharding.make_mesh()
    local = as_processes(2, lambda: list(input_pipeline.eval_batches(config.data, config.train.eval_batch_size)))
    bpd_fn = bpd.make_bpd_fn(bpd.flow_apply(run.model), mesh, config.train.seed)
    total, count, offset = 0.0, 0, 0
    for parts in zip(*local, strict=True):
        batch = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label", "mask")}
        values = np.asarray(bpd_fn(run.params, batch["image"], batch["label"], offset))
        total, count, offset = total + values[batch["mask"]].sum(), count + batch["mask"].sum(), offset + len(values)
    assert count == 12
    # Measured equal to the last bit; the same params in the 1-process order (other noise per image) differ
    # by 9e-5, a dropped or doubled image by far more.
    assert abs(reported[0] - total / count) < 1e-5, (reported[0], total / count)


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

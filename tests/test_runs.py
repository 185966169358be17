"""Workdirs as typed runs: first-release layouts still load, and a job dir is one thing to point at."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from biflow_jax import checkpoint, runs
from biflow_jax.models.reverse import ReverseViT
from biflow_jax.models.tarflow import TARFlow

FLOW = dict(channels=32, clip=0.0, dtype="float32", expansion=4, head_dim=32, img_size=8, in_channels=1,
            layers_per_block=1, num_blocks=2, num_classes=10, patch_size=2)
# config.json as the first release wrote it for a stage-2 run (top-level reverse / reverse_train).
LEGACY_STAGE2 = {
    "data": {"channels": 1, "data_dir": "", "folder": "", "image_size": 8, "name": "digits", "num_classes": 10,
             "random_flip": False, "shuffle_buffer": 50000, "test_split": "test", "train_split": "train"},
    "forward_workdir": "FORWARD", "model": FLOW,
    "optim": {"b1": 0.9, "b2": 0.95, "end_lr": 1e-05, "grad_clip": 1.0, "init_lr": 1e-06, "lr": 0.001,
              "warmup_steps": 4, "weight_decay": 0.0001},
    "parallel": {"backend": "jit", "fsdp": False},
    "reverse": {"depth": 3, "dtype": "float32", "guidance_conditioning": True, "heads": 2, "layers_per_stage": None,
                "mlp_ratio": 4.0, "num_classes": 10, "size": "tiny", "stage_bottleneck": False, "width": 32},
    "reverse_train": {"adaptive": True, "adaptive_c": 0.01, "adaptive_p": 1.0, "cfg_training": True,
                      "guidance": 1.0, "lr": 0.001, "objective": "hidden_alignment", "steps": 40, "w_max": 3.0,
                      "w_min": 0.0},
    "sample": {"annealed": False, "attn_temp": 1.0, "batch_size": 100, "denoise": False, "guidance": 0.0,
               "guide_what": "ab", "jacobi_max_iters": 0, "jacobi_tol": 0.0001, "noise_scale": 1.0,
               "num_images": 100, "rule": "cfg", "solver": "cached"},
    "stage": "biflow",
    "train": {"batch_size": 64, "checkpoint_every": 30, "ema_decay": 0.999, "eval_batch_size": 300,
              "eval_every": 40, "keep_checkpoints": 2, "label_drop": 0.1, "log_every": 50, "noise": "uniform",
              "noise_std": 0.0, "seed": 0, "steps": 40}}


def write_run(workdir, config, params, step):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, checkpoint.CONFIG_FILE), "w") as f:
        json.dump(config, f)
    mngr = checkpoint.manager(workdir, async_save=False)
    checkpoint.save(mngr, step, params, params, {"count": np.zeros((), np.int32)}, step)
    mngr.wait_until_finished()
    mngr.close()


@pytest.fixture(scope="module")
def legacy_job(tmp_path_factory):
    """A first-release two-stage job dir: JOB/forward (stage 1) and JOB/reverse (stage 2), no stage.json."""
    job = str(tmp_path_factory.mktemp("legacy") / "job")
    flow = TARFlow(**{k: v for k, v in FLOW.items() if k != "dtype"})
    flow_params = flow.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32), np.zeros((1,), np.int32))
    g = ReverseViT(num_tokens=16, token_dim=4, num_forward_blocks=2, depth=3, width=32, heads=2, mlp_ratio=4.0,
                   num_classes=10)
    g_params = g.init(jax.random.key(1), np.zeros((1, 16, 4), np.float32), np.zeros((1,), np.int32),
                      np.zeros((1,), np.float32))
    stage1 = {k: v for k, v in LEGACY_STAGE2.items() if k not in ("forward_workdir",)}
    write_run(os.path.join(job, "forward"), dict(stage1, stage="both", forward_workdir=""), flow_params, 60)
    stage2 = dict(LEGACY_STAGE2, forward_workdir=os.path.join(job, "forward"))
    write_run(os.path.join(job, "reverse"), stage2, g_params, 40)
    return job, flow_params, g_params


def same(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_first_release_job_dir_loads_both_stages(legacy_job):
    job, flow_params, g_params = legacy_job
    for where in (job, os.path.join(job, "reverse")):
        run = runs.load_reverse(where)
        assert run.step == 40 and run.flow.step == 60
        same(run.params, g_params)
        same(run.flow.params, flow_params)
        b = run.config.biflow  # the upgraded sections
        assert b.model.variant == "tiny" and b.model.depth == 3 and b.train.steps == 40 and b.optim.lr == 0.001
        assert run.model.num_classes == run.flow.model.num_classes == 10
    assert runs.load_flow(job).workdir == os.path.join(job, "forward")
    assert runs.load_flow(os.path.join(job, "reverse")).workdir == os.path.join(job, "forward")


def test_moved_first_release_job_dir_finds_its_own_forward_run(legacy_job, tmp_path):
    job, flow_params, _ = legacy_job
    moved = str(tmp_path / "moved")
    shutil.copytree(job, moved)
    run = runs.load_reverse(moved)  # its config still names the old absolute forward_workdir
    assert os.path.samefile(run.flow.workdir, os.path.join(moved, "forward"))
    same(run.flow.params, flow_params)


def test_a_directory_without_a_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run"):
        runs.load_flow(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such workdir"):
        runs.load_reverse(str(tmp_path / "absent"))

"""Training on the digits end to end: quality against a baseline, resume after SIGKILL,
device-count invariance, and clear failures on bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers.compile_flags import host_devices
from helpers.configs import quick_config
from helpers.paths import REPO

from biflow_jax import checkpoint, sharding
from biflow_jax.errors import ConfigError, DataError, TrainingError
from biflow_jax.evaluators import bpd
from biflow_jax.modes import train

STEPS = 100
OVERRIDES = ["--config.stage=flow", f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=50",
             "--config.train.eval_every=100", "--config.evals.bpd.every=100", "--config.train.log_every=50",
             "--config.train.keep_checkpoints=3"]


def short_config():
    return quick_config("flow", STEPS)


def main_cmd(workdir, *extra):
    return [sys.executable, "-m", "biflow_jax.main", "--config=configs/digits.py:quick", f"--workdir={workdir}",
            *OVERRIDES, *extra]


def final_params(workdir):
    mngr = checkpoint.manager(workdir, async_save=False)
    step = mngr.latest_step()
    params = mngr.restore(step, args=checkpoint.ocp.args.Composite(
        params=checkpoint.ocp.args.StandardRestore()))["params"]
    mngr.close()
    return step, params


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted short run, in process."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    results = train.train_and_evaluate(short_config(), workdir)["flow"]
    return workdir, results


def test_flow_beats_diagonal_gaussian_baseline(trained):
    _, results = trained
    baseline = bpd.gaussian_baseline_bpd(short_config(), sharding.make_mesh())
    assert 4.0 < baseline < 9.0  # sanity: bits/dim of 8-bit-scaled digits
    assert results["test_bpd"] < baseline - 0.05, (results, baseline)  # measured margin ~0.15


def test_sigkill_then_rerun_resumes_to_identical_params(trained, tmp_path):
    workdir = str(tmp_path / "killed")
    proc = subprocess.Popen(main_cmd(workdir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = os.path.join(workdir, "checkpoints", "50")
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(first, "_CHECKPOINT_METADATA")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(workdir, "checkpoints", str(STEPS))), "killed too late to test resume"

    rerun = subprocess.run(main_cmd(workdir), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "from step 50" in rerun.stdout  # it resumed, not restarted
    step_a, params_a = final_params(trained[0])
    step_b, params_b = final_params(workdir)
    assert step_a == step_b == STEPS
    for a, b in zip(jax.tree_util.tree_leaves(params_a), jax.tree_util.tree_leaves(params_b)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_eight_devices_match_one_device():
    # The suite's compile flags: compile-bound, and both sides of the comparison are compiled with them.
    env = dict(os.environ, XLA_FLAGS=host_devices(8))
    out = subprocess.run([sys.executable, "tests/multidevice_steps.py"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Same global batch and per-example noise; only the order of float32 reductions differs.
    np.testing.assert_allclose(result["loss8"], result["loss1"], rtol=1e-5)
    assert result["max_param_diff"] < 1e-5 * max(1.0, result["param_scale"]), result


def test_nan_loss_stops_and_keeps_last_good_checkpoint(trained, tmp_path):
    workdir = str(tmp_path / "nan")
    shutil.copytree(trained[0], workdir)
    config = short_config()
    config.train.steps = STEPS + 50
    config.optim.lr = 1e8  # diverges within a few steps (same optimizer structure, so it resumes)
    with pytest.raises(TrainingError, match="NaN"):
        train.train_and_evaluate(config, workdir)
    step, params = final_params(workdir)
    assert step == STEPS
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree_util.tree_leaves(params))


def test_bad_config_values_fail_before_touching_the_workdir(tmp_path):
    workdir = str(tmp_path / "never")
    config = short_config()
    config.model.patch_size = 3
    with pytest.raises(ConfigError, match="not divisible by model.patch_size=3"):
        train.train_and_evaluate(config, workdir)
    config = short_config()
    config.data.name = "no_such_dataset_xyz"
    with pytest.raises(DataError, match="no_such_dataset_xyz"):
        train.train_and_evaluate(config, workdir)
    config = short_config()
    config.data.update(name="mnist", data_dir=str(tmp_path / "missing_dir"))
    with pytest.raises(DataError, match="does not exist"):
        train.train_and_evaluate(config, workdir)
    assert not os.path.exists(workdir)


def test_cli_reports_unknown_config_key_and_bad_values(tmp_path):
    workdir = str(tmp_path / "cli")
    out = subprocess.run(main_cmd(workdir, "--config.train.no_such_key=1"), cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: unknown config key 'train.no_such_key'; did you mean "), lines
    assert "'train.noise'" in lines[0]
    out = subprocess.run(main_cmd(workdir, "--config.model.patch_size=3"), cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: model.img_size=8 is not divisible")
    assert not os.path.exists(workdir)

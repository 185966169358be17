"""Faults: one writer per workdir, a NaN guard that never keeps poison, damaged checkpoints, a full disk,
and non-checkpoint files given to import_torch; each ends in one clear line, never a traceback."""

import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers.configs import tiny_config
from helpers.paths import REPO

from biflow_jax import checkpoint, runs, trainer, workdir_lock
from biflow_jax.errors import CheckpointError, TrainingError, WorkdirBusyError
from biflow_jax.models import registry
from biflow_jax.modes import sample as sample_mode
from biflow_jax.objectives import flow

TINY = ["--config.model.num_blocks=2", "--config.model.layers_per_block=1", "--config.model.channels=32",
        "--config.model.head_dim=32", "--config.train.batch_size=16", "--config.optim.warmup_steps=1"]


def short_run(steps: int, checkpoint_every: int = 2, lr: float | None = None):
    """`steps` of a 2-block, 1-layer, 32-wide flow on the digits; a constant `lr` when given."""
    config = tiny_config("flow", steps)
    config.train.update(batch_size=16, checkpoint_every=checkpoint_every, log_every=checkpoint_every,
                        keep_checkpoints=2)
    config.optim.update(warmup_steps=1)
    if lr is not None:
        config.optim.update(lr=lr, init_lr=lr, end_lr=lr)
    return config


def train(config, workdir):
    return trainer.run(flow.make(config, registry.build_flow(config.model)), [], config, workdir, "flow")


def steps_of(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def saved_params(workdir, step):
    mngr = checkpoint.manager(workdir, async_save=False)
    try:
        return checkpoint.restore_item(mngr, step, "params")
    finally:
        mngr.close()


def digests(workdir):
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """4 steps, checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("faults") / "run")
    train(short_run(4), workdir)
    assert steps_of(workdir) == [2, 4]
    return workdir


def copy_of(base_run, tmp_path, name):
    workdir = str(tmp_path / name)
    shutil.copytree(base_run, workdir)
    return workdir


def cli(*args):
    return subprocess.Popen([sys.executable, "-m", "biflow_jax.main", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_second_writer_exits_2_and_leaves_the_first_runs_files_byte_identical(base_run, tmp_path):
    """A training run and a sample run (it writes WORKDIR/samples/) on a workdir a live run owns."""
    workdir = copy_of(base_run, tmp_path, "busy")
    with workdir_lock.hold(workdir):  # this test process is the live first run
        before = digests(workdir)
        runs_ = {"train": cli("--config=configs/digits.py:quick", f"--workdir={workdir}", "--config.stage=flow",
                              "--config.train.seed=1", *TINY),
                 "sample": cli(f"--workdir={workdir}", "--mode=sample", "--num_images=2")}
        try:
            outs = {name: (p.communicate(timeout=300)[1], p.returncode) for name, p in runs_.items()}
        finally:
            for p in runs_.values():
                p.kill()
        after = digests(workdir)
    for name, (stderr, returncode) in outs.items():
        assert returncode == 2, (name, stderr[-2000:])
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in stderr, (name, stderr[-2000:])
        assert "is in use by another run" in errors[0], errors
        assert f"pid {os.getpid()}" in errors[0] and socket.gethostname() in errors[0], errors
    assert after == before and workdir_lock.LOCK_FILE in before
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # released at exit


def test_stale_and_foreign_locks(tmp_path, caplog):
    workdir = str(tmp_path / "locked")
    os.makedirs(workdir)
    lock = os.path.join(workdir, workdir_lock.LOCK_FILE)
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(lock, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}, f)
    with caplog.at_level(logging.WARNING), workdir_lock.hold(workdir):
        with open(lock) as f:
            assert json.load(f)["pid"] == os.getpid()
        with workdir_lock.hold(workdir):  # re-entrant in one process (job dir, then the stage's loop)
            pass
        assert os.path.exists(lock)
    assert any(f"pid {dead.pid} is no longer running" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(lock)
    # Another host's lock, refreshed recently: busy; not refreshed for STALE_AFTER_S: taken over.
    with open(lock, "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "started": "earlier"}, f)
    with pytest.raises(WorkdirBusyError, match="host elsewhere pid 1"):
        with workdir_lock.hold(workdir):
            pass
    old = time.time() - workdir_lock.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    with workdir_lock.hold(workdir):
        pass


def test_read_modes_lock_the_workdir_and_the_stage_run_they_write_into(tmp_path):
    """sample/edit/compare write WORKDIR/samples/ and the stage run's TensorBoard: both are locked."""
    job = tmp_path / "job"
    forward, reverse = str(job / runs.FORWARD_DIR), str(job / runs.REVERSE_DIR)
    for workdir, stage, objective, flow_workdir in ((forward, "flow", "flow", None),
                                                    (reverse, "biflow", "biflow", forward)):
        checkpoint.write_config(workdir, short_run(2))
        runs.write_stage_file(workdir, stage, objective, flow_workdir)
    locks = [os.path.join(d, workdir_lock.LOCK_FILE) for d in (str(job), forward, reverse)]
    for workdir, stage, held in ((str(job), "flow", (0, 1)), (str(job), "biflow", (0, 2)),
                                 (reverse, "flow", (2, 1)), (forward, "biflow", (1,))):
        with sample_mode.writing_into(workdir, stage):
            assert [os.path.exists(lock) for lock in locks] == [i in held for i in range(3)], (workdir, stage)
        assert not any(os.path.exists(lock) for lock in locks)


def test_divergence_never_leaves_a_poisoned_newest_checkpoint(base_run, tmp_path):
    """lr 1e3 on resume with a checkpoint every step: the params saved after the first update give a NaN
    loss at the next step; that checkpoint is deleted and the newest one is the last good step, whose
    params are finite and which resumes to a normal run."""
    workdir = copy_of(base_run, tmp_path, "diverged")
    with pytest.raises(TrainingError, match="NaN/inf") as err:
        train(short_run(12, checkpoint_every=1, lr=1e3), workdir)
    good = steps_of(workdir)
    newest = good[-1]
    assert f"last good checkpoint is step {newest}" in str(err.value)
    assert len(good) == 2  # keep_checkpoints good steps: none was dropped for an unverified one
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree_util.tree_leaves(saved_params(workdir, newest)))
    poisoned = int(re.search(r"params saved at step (\d+) diverged", str(err.value)).group(1))
    # The same updates in a run that ends at the poisoned step: its final save is verified after the loop
    # (the loss of the next batch) and deleted, not left as the newest checkpoint.
    with pytest.raises(TrainingError, match=f"params saved at step {poisoned} diverged"):
        train(short_run(poisoned, checkpoint_every=1, lr=1e3), workdir)
    assert steps_of(workdir) == good
    train(short_run(newest + 2, checkpoint_every=1), workdir)  # a normal run resumes from it
    # Its final save is verified at the end, so keep_checkpoints=2 leaves exactly the last two steps.
    assert steps_of(workdir) == [newest + 1, newest + 2]
    final = saved_params(workdir, newest + 2)
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree_util.tree_leaves(final))


def truncate_arrays(step_dir, item="params"):
    files = glob.glob(os.path.join(step_dir, item, "ocdbt.process_0", "d", "*"))
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_step(base_run, tmp_path, caplog):
    workdir = copy_of(base_run, tmp_path, "truncated")
    truncate_arrays(os.path.join(workdir, "checkpoints", "4"))
    with pytest.raises(CheckpointError, match=r"checkpoint step 4 of .* is damaged \(.*params"):
        config = short_run(6)
        config.train.on_damaged_checkpoint = "stop"
        train(config, workdir)
    assert steps_of(workdir) == [2, 4]  # 'stop' deletes nothing
    with caplog.at_level(logging.WARNING):
        train(short_run(6), workdir)
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "checkpoint step 4" in warnings[0] and "falling back to step 2" in warnings[0]
    assert "/checkpoints/4/params" in warnings[0]  # names the bad file's database
    # Step 4 trained again from step 2 and saved afresh; the final step 6 is verified at the end, so 2 remain.
    assert steps_of(workdir) == [4, 6]


def test_read_modes_say_damaged_not_missing(base_run, tmp_path):
    workdir = copy_of(base_run, tmp_path, "all_damaged")
    for step in (2, 4):
        truncate_arrays(os.path.join(workdir, "checkpoints", str(step)), "ema_params")
    with pytest.raises(CheckpointError, match=r"every checkpoint of workdir .* is damaged"):
        runs.load_flow(workdir)


def full_disk_or_injected(monkeypatch, tmp_path) -> str:
    """A directory on a 64 KiB tmpfs where this test may mount one (root), else one whose saves fail
    with an injected ENOSPC."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                            capture_output=True).returncode == 0:
        return str(mount)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save", no_space)
    return str(mount)


def test_full_disk_stops_at_the_failing_save_naming_the_last_good_step(base_run, tmp_path, monkeypatch):
    disk = full_disk_or_injected(monkeypatch, tmp_path)
    try:
        mngr = checkpoint.manager(disk, keep=None)
        params = saved_params(base_run, 4)
        with pytest.raises(CheckpointError) as err:
            checkpoint.save_and_wait(mngr, 6, params, params, {"count": np.zeros((), np.int32)}, 6, last_good=4)
        message = str(err.value)
        assert "\n" not in message and "saving checkpoint step 6" in message
        assert "No space left on device" in message and "the last good checkpoint is step 4" in message
    finally:
        subprocess.run(["umount", disk], capture_output=True)


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"\x80\x02garbage that is not a pickle",
                                     b"\x80\x04" + b"\xd5" * 64],
                         ids=["empty", "random", "bad_pickle", "protocol_4_garbage"])
def test_import_torch_says_one_clean_line_for_non_checkpoint_files(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    done = subprocess.run([sys.executable, "-m", "biflow_jax.import_torch", f"--checkpoint={path}",
                           f"--config={REPO}/configs/digits.py:quick", f"--workdir={tmp_path / 'never'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(path) in err[0], err
    assert "weights_only" not in err[0]  # torch's advice to unpickle code, impossible from the CLI anyway
    assert ("is empty (0 bytes)" in err[0]) == (not content)
    assert not (tmp_path / "never").exists()


def test_a_moved_job_dir_reads_its_own_forward_run(tmp_path):
    """Stage 2 stores its flow's workdir relative to itself inside a job dir, so a copy finds its own."""
    job = tmp_path / "job"
    forward, reverse = str(job / runs.FORWARD_DIR), str(job / runs.REVERSE_DIR)
    config = short_run(2)
    checkpoint.write_config(forward, config)
    checkpoint.write_config(reverse, config)
    runs.write_stage_file(forward, "flow", "flow")
    runs.write_stage_file(reverse, "biflow", "biflow", forward)
    with open(os.path.join(reverse, runs.STAGE_FILE)) as f:
        assert json.load(f)["flow_workdir"] == os.path.join("..", runs.FORWARD_DIR)
    moved = tmp_path / "moved"
    shutil.copytree(job, moved)
    shutil.rmtree(job)
    found = runs.flow_workdir_of(str(moved / runs.REVERSE_DIR))
    assert os.path.samefile(found, moved / runs.FORWARD_DIR)
    assert os.path.samefile(runs.stage_dir(str(moved / runs.REVERSE_DIR), "flow"), moved / runs.FORWARD_DIR)


def test_eval_mode_beside_a_live_owner_stops_before_writing(tmp_path):
    """--mode=eval writes WORKDIR/eval and TensorBoard events: another process owning the workdir stops it."""
    from biflow_jax.modes import eval as eval_mode

    workdir = tmp_path / "run"
    workdir.mkdir()
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from biflow_jax import workdir_lock\n"
         f"with workdir_lock.hold({str(workdir)!r}):\n    print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        before = sorted(os.listdir(workdir))
        with pytest.raises(WorkdirBusyError, match="in use by another run"):
            eval_mode.run_eval(str(workdir), sampler="exact", ref=str(tmp_path / "ref.npz"))
        assert sorted(os.listdir(workdir)) == before  # nothing written: no eval/, no events
    finally:
        owner.kill()
        owner.wait()

"""Parallel modes: 2 processes x 2 devices train exactly like 1 process x 4 devices, in every
mode (jit, pmap, fsdp), each resuming the others' checkpoints; pmap, jit and fsdp take the same
steps on 8 devices; fsdp keeps 1/N of the params per device; checkpoints restore in any
layout and device count.

The runs happen in subprocesses (tests/multiprocess_worker.py), started by one fixture: two
gloo-connected trainers, then a 4-device reference beside an 8-device comparison of the modes.
The reference is fed the same global batches as the trainers (each trainer process reads its
own shard of the split; the reference rebuilds both shards with the same input pipeline).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import multiprocess_worker as worker
import numpy as np
import pytest
from helpers.compile_flags import host_devices
from helpers.paths import REPO
from jax.sharding import PartitionSpec as P

from biflow_jax import sharding
from biflow_jax.config_checks import validate_parallel
from biflow_jax.errors import ConfigError
from biflow_jax.runs import load_flow

# Same global batches, devices and per-example noise; only the order of float32 sums differs
# (gloo's cross-process all-reduce, GSPMD's sharded reductions). Measured <= 3e-8 on values of
# magnitude <= 1.001 (params, EMA, Adam moments), while the steps compared move the params by
# 6e-4 (lr 3e-4) and a wrong gradient mean shows in Adam's moments at any lr.
TOL = 1e-6
TIMEOUT = 600  # seconds per subprocess; compile-bound, and the machine may be shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(devices: int, *args: str, default_emitters: bool = False) -> subprocess.Popen:
    """The suite's compile flags (these runs are compile-bound; every comparison is between runs made with
    the same flags). `default_emitters`: XLA's own fusion emitters, for the bitwise pmap == jit check: with
    the suite's classic emitters the two programs differ in the last bits (3e-8)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=host_devices(devices, default_emitters))
    return subprocess.Popen([sys.executable, worker.__file__, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> tuple[dict | None, str]:
    """(the JSON result, or None from a process other than 0; stdout)."""
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-4000:]
    results = [line[len(worker.RESULT):] for line in out.splitlines() if line.startswith(worker.RESULT)]
    return (json.loads(results[-1]) if results else None), out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("parallel"))
    port = str(free_port())
    procs = [start(2, "train", port, str(i), root) for i in range(worker.PROCESSES)]
    try:
        (trained, log), _ = [finish(p) for p in procs]
        # two cores: two processes at a time
        procs += [start(4, "reference", root), start(8, "backends", default_emitters=True)]
        (reference, _), (backends, _) = [finish(p) for p in procs[2:]]
    finally:
        for p in procs:  # e.g. a trainer whose peer died waits on the coordinator: end it
            if p.poll() is None:
                p.kill()
    return {"root": root, "trained": trained, "log": log, "backends": backends, "reference": reference}


def tolerance(result: dict) -> float:
    return TOL * max(1.0, result["param_scale"])


def test_two_processes_train_like_one_process_with_four_devices(runs):
    reference = runs["reference"]
    assert reference["moved"] > 100 * tolerance(reference)  # the steps compared are not no-ops
    for mode, step in worker.SEGMENTS:  # each mode's multi-process checkpoint, restored on 4 devices of one process
        restored = reference["restored"][f"{mode}@{step}->jit"]
        assert restored["step"] == step
        assert restored["max_diff"] < tolerance(reference), (mode, restored)
    bpd = [runs["trained"][mode]["test_bpd"] for mode in worker.MODES]  # the loop's eval, across processes
    assert np.all(np.isfinite(bpd)), bpd


def test_two_processes_resume_each_others_checkpoints_across_modes(runs):
    start = 0
    for mode, step in worker.SEGMENTS:  # resumed, not restarted (the restored states match: test above)
        assert f"from step {start} to {step} on 4 device(s)" in runs["log"], (mode, runs["log"][-3000:])
        start = step


def test_pmap_jit_and_fsdp_take_the_same_steps_on_eight_devices(runs):
    b = runs["backends"]
    for mode in ("pmap", "fsdp"):
        np.testing.assert_allclose(b["losses"][mode], b["losses"]["jit"], rtol=1e-6)
        assert b["max_diff_vs_jit"][mode] < tolerance(b), b
    # pmap and the jit step run the same per-device program (compiled with XLA's default emitters: start())
    assert b["max_diff_vs_jit"]["pmap"] == 0.0


def test_fsdp_keeps_one_eighth_of_the_sharded_params_per_device(runs):
    nbytes = runs["backends"]["param_bytes"]
    small = nbytes["fsdp_replicated_leaves"]  # leaves under sharding.MIN_SHARDED_ELEMENTS stay whole
    assert nbytes["jit"] == nbytes["pmap"] == nbytes["total"]
    assert nbytes["fsdp"] == small + (nbytes["total"] - small) // 8, nbytes
    assert small < 0.15 * nbytes["total"]
    assert nbytes["fsdp_state"] < 0.25 * nbytes["jit_state"], nbytes  # params, EMA and both Adam moments


def test_multiprocess_checkpoints_restore_sharded_and_on_one_device(runs):
    reference = runs["reference"]
    for mode, step in worker.SEGMENTS:  # into fsdp shardings over 4 devices
        restored = reference["restored"][f"{mode}@{step}->fsdp"]
        assert restored["max_diff"] < tolerance(reference), (mode, restored)
        assert "P('data', None)" in restored["specs"] and "P()" in restored["specs"]
    workdir = os.path.join(runs["root"], "run")
    mesh = sharding.make_mesh(jax.devices()[:1])
    with np.load(os.path.join(runs["root"], "reference.npz")) as saved:
        for mode, step in worker.SEGMENTS:  # here, in one process with one device
            state = worker.restored_state(workdir, worker.segment_config("jit"), mesh, step=step)
            got = jax.tree_util.tree_leaves(worker.trainable(state))
            expected = [saved[f"{step}_{i}"] for i in range(len(got))]
            assert f"{step}_{len(got)}" not in saved.files
            assert worker.max_diff(got, expected) < tolerance(reference), mode
    loaded = load_flow(workdir)  # no target: saved on 4 devices of 2 processes
    assert loaded.config.parallel.fsdp
    assert worker.max_diff(loaded.params, state.ema_params) == 0.0


def test_fsdp_spec_shards_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((64, 192), 8, "data") == P(None, "data")
    assert sharding.fsdp_spec((256, 64), 8, "data") == P("data", None)
    assert sharding.fsdp_spec((64, 64), 8, "data") == P("data", None)  # ties: the first
    assert sharding.fsdp_spec((1000, 12), 8, "data") == P("data", None)  # 12 is not divisible
    assert sharding.fsdp_spec((10, 1, 64), 8, "data") == P()  # 640 elements: small
    assert sharding.fsdp_spec((33, 33), 8, "data") == P()  # nothing divisible
    assert sharding.fsdp_spec((), 8, "data") == P()
    assert sharding.fsdp_spec((64, 192), 1, "data") == P()


def test_fsdp_with_pmap_is_refused():
    config = worker.segment_config("pmap")
    config.parallel.fsdp = True
    with pytest.raises(ConfigError, match="parallel.fsdp=True needs parallel.backend='jit'"):
        validate_parallel(config)

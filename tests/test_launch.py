"""Tests for the launch scripts (dry runs, restart loop) and biflow_jax.distributed.

Nothing here starts a coordinator: jax.distributed.initialize is replaced by a
recorder, and the scripts run against a fake `gcloud` or in --dry-run mode.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import pytest
from absl import flags

from biflow_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_pod.sh"
GPU = LAUNCH / "gpu_host.sh"
SLURM = LAUNCH / "slurm_multi_gpu.sbatch"

_ENV_PREFIXES = ("SLURM_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS")
_ENV_NAMES = ("BIFLOW_COORDINATOR_PORT", "CUDA_VISIBLE_DEVICES")


def _bash(script: pathlib.Path, *args: str, env: dict[str, str] | None = None,
          cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    """Runs a launch script; without `env`, in this environment with this interpreter's bin dir first on
    PATH, so the scripts' default `python` is the one running the tests (an unactivated venv included)."""
    if env is None:
        env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_ENV_PREFIXES) and k not in _ENV_NAMES}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------
# Shell scripts.
# ---------------------------------------------------------------------------

def test_every_launch_file_passes_bash_syntax_check():
    files = sorted(p for p in LAUNCH.iterdir() if p.is_file())
    assert {TPU, GPU, SLURM} <= set(files)
    for path in files:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
        assert "set -euo pipefail" in path.read_text(), path.name


def _path_without_gcloud(tmp_path: pathlib.Path) -> str:
    """A PATH holding only the few tools the dry run may use (no gcloud)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "sed", "head"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    return str(bin_dir)


def test_tpu_dry_run_prints_all_commands_without_gcloud(tmp_path):
    env = _clean_env(PATH=_path_without_gcloud(tmp_path))
    result = subprocess.run(
        [shutil.which("bash"), str(TPU), "--dry-run", "--name=biflow-pod", "--zone=us-central2-b",
         "--accelerator=v4-32", "--version=tpu-ubuntu2204-base", "--spot",
         "--config=configs/imagenet64.py:small", "--workdir=gs://bucket/biflow/run1",
         "--", "--config.training.batch_size=1024"],
        capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = [l for l in out.splitlines() if l.strip()]
    assert all(l.startswith(("+ ", "# ")) for l in lines), out
    assert "+ gcloud compute tpus tpu-vm describe biflow-pod --zone=us-central2-b" in out
    create = [l for l in lines if "tpu-vm create biflow-pod" in l]
    assert len(create) == 1
    assert "--accelerator-type=v4-32" in create[0] and "--version=tpu-ubuntu2204-base" in create[0]
    assert create[0].endswith("--spot")
    assert "pip install -r requirements.txt -e ." in out
    assert "jax[tpu]" in out
    main = [l for l in lines if "biflow_jax.main" in l]
    assert len(main) == 1
    for needle in ("tpu-vm ssh biflow-pod", "--worker=all", "python -m biflow_jax.main",
                   "--config=configs/imagenet64.py:small", "--workdir=gs://bucket/biflow/run1",
                   "--distributed=on", "--config.training.batch_size=1024"):
        assert needle in main[0], needle
    # Code and install reach every worker, not only worker 0.
    assert all("--worker=all" in l for l in lines if "tpu-vm ssh" in l or "tpu-vm scp" in l)


def test_tpu_requires_gs_workdir():
    result = _bash(TPU, "--dry-run", "--name=n", "--zone=z", "--accelerator=v4-8",
                   "--config=c.py", "--workdir=/local/dir")
    assert result.returncode == 2
    assert "gs://" in result.stderr
    assert "biflow_jax.main" not in result.stdout


_FAKE_GCLOUD = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Fake gcloud: VM state in $FAKE_STATE, one log line per call in $FAKE_LOG.
    echo "$*" >> "$FAKE_LOG"
    case "$4" in
      describe) [ -f "$FAKE_STATE" ] || exit 1; cat "$FAKE_STATE" ;;
      create) echo READY > "$FAKE_STATE" ;;
      delete) rm -f "$FAKE_STATE" ;;
      scp) ;;
      ssh)
        case "$*" in
          *biflow_jax.main*)
            n=$(grep -c biflow_jax.main "$FAKE_LOG")
            if [ "$n" -le "${FAKE_FAILS:-0}" ]; then
              echo "${FAKE_FAIL_STATE:-PREEMPTED}" > "$FAKE_STATE"; exit "${FAKE_RC:-255}"
            fi ;;
        esac ;;
    esac
    exit 0
    """)


def _run_tpu_with_fake_gcloud(tmp_path, **fake_env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(_FAKE_GCLOUD)
    gcloud.chmod(0o755)
    log = tmp_path / "gcloud.log"
    env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
                     FAKE_STATE=str(tmp_path / "state"), TMPDIR=str(tmp_path), **fake_env)
    result = _bash(TPU, "--name=pod", "--zone=z", "--accelerator=v4-16", "--preemptible",
                   "--config=configs/c.py", "--workdir=gs://b/run", "--retry_wait=0",
                   "--max_restarts=3", env=env)
    return result, log.read_text().splitlines()


def test_tpu_recreates_preempted_vm_and_reruns_same_command(tmp_path):
    result, calls = _run_tpu_with_fake_gcloud(tmp_path, FAKE_FAILS="1")
    assert result.returncode == 0, result.stderr
    creates = [i for i, c in enumerate(calls) if c.startswith("compute tpus tpu-vm create pod")]
    deletes = [i for i, c in enumerate(calls) if c.startswith("compute tpus tpu-vm delete pod")]
    mains = [i for i, c in enumerate(calls) if "biflow_jax.main" in c]
    installs = [i for i, c in enumerate(calls) if "pip install -r requirements.txt" in c]
    assert len(creates) == 2 and all("--preemptible" in calls[i] for i in creates)
    # Order: create, setup, run (preempted), delete, create, setup, run again.
    assert len(deletes) == 1 and len(mains) == 2 and len(installs) == 2
    assert creates[0] < installs[0] < mains[0] < deletes[0] < creates[1] < installs[1] < mains[1]
    assert mains[1] == len(calls) - 1
    assert calls[mains[0]] == calls[mains[1]]  # Same command, same workdir: resumes.
    assert "--workdir=gs://b/run" in calls[mains[1]] and "--worker=all" in calls[mains[1]]
    assert (tmp_path / "biflow_src_pod.tar.gz").exists()


def test_tpu_does_not_retry_real_failures_on_healthy_vm(tmp_path):
    result, calls = _run_tpu_with_fake_gcloud(tmp_path, FAKE_FAILS="5", FAKE_FAIL_STATE="READY",
                                              FAKE_RC="3")
    assert result.returncode == 3
    assert len([c for c in calls if "biflow_jax.main" in c]) == 1
    assert len([c for c in calls if "tpu-vm create" in c]) == 1
    assert not any("tpu-vm delete" in c for c in calls)


def test_gpu_host_dry_run_default_jit_and_pmap(tmp_path):
    default = _bash(GPU, "--dry-run", "--config=configs/digits.py", "--workdir=runs/a", cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    main = [l for l in default.stdout.splitlines() if "biflow_jax.main" in l]
    assert len(main) == 1 and main[0].startswith("+ python -m biflow_jax.main")
    # A relative workdir is made absolute before the script cds into the repo.
    assert f"--workdir={tmp_path}/runs/a" in main[0]
    assert "--config.parallel.backend=jit" in main[0] and "pmap" not in main[0]
    assert "pip install" not in default.stdout

    pmap = _bash(GPU, "--dry-run", "--backend=pmap", "--install", "--mem_fraction=0.9",
                 "--config=configs/digits.py:quick", "--workdir=/runs/b", "--", "--config.train.seed=3")
    assert pmap.returncode == 0, pmap.stderr
    out = pmap.stdout
    assert "pip install -r requirements.txt -e ." in out and "jax[cuda12]" in out
    assert "+ export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in out
    main = out.strip().splitlines()[-1]
    for needle in ("-m biflow_jax.main", "--workdir=/runs/b", "--config.parallel.backend=pmap",
                   "--config.train.seed=3"):
        assert needle in main, needle

    bad = _bash(GPU, "--dry-run", "--backend=tpu", "--config=c", "--workdir=w")
    assert bad.returncode == 2 and "biflow_jax.main" not in bad.stdout


def test_gpu_host_checks_the_config_file_and_keys_and_its_header_example_runs():
    missing = _bash(GPU, "--dry-run", "--config=configs/imagenet64_biflow.py", "--workdir=/w")
    assert missing.returncode == 2 and "config file not found: configs/imagenet64_biflow.py" in missing.stderr
    typo = _bash(GPU, "--dry-run", "--config=configs/imagenet64.py:p2", "--workdir=/w", "--",
                 "--config.training.batch_size=256")
    assert typo.returncode == 2 and "biflow_jax.main" not in typo.stdout
    assert "unknown config key 'training.batch_size'; did you mean 'train.batch_size'" in typo.stderr
    # The example in the script's header, as written there.
    header = GPU.read_text().split("# Example", 1)[1].split("set -euo pipefail")[0]
    example = " ".join(line.lstrip("#").strip().rstrip("\\").strip() for line in header.splitlines()[1:]
                       if line.strip("# "))
    words = example.split()
    assert words[0] == "launch/gpu_host.sh"
    result = _bash(GPU, "--dry-run", *words[1:])
    assert result.returncode == 0, result.stderr
    assert "--config.train.batch_size=256" in result.stdout.strip().splitlines()[-1]


def test_slurm_template_headers_and_dry_run():
    text = SLURM.read_text()
    options = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    headers = dict(o.lstrip("-").split("=", 1) for o in options if "=" in o)
    for key in ("nodes", "ntasks-per-node", "gpus-per-node", "time"):
        assert key in headers, key
    assert headers["ntasks-per-node"] == headers["gpus-per-node"]  # One task per GPU.

    env = _clean_env(DRY_RUN="1", CONFIG="configs/c.py:big", WORKDIR="/shared/runs/x")
    result = _bash(SLURM, "--config.seed=7", env=env)
    assert result.returncode == 0, result.stderr
    srun = [l for l in result.stdout.splitlines() if "srun" in l]
    assert len(srun) == 1 and srun[0].startswith("+ srun ")
    for needle in ("python -m biflow_jax.main", "--config=configs/c.py:big",
                   "--workdir=/shared/runs/x", "--distributed=on", "--config.seed=7"):
        assert needle in srun[0], needle

    missing = _bash(SLURM, env=_clean_env())  # Not a dry run: CONFIG is required.
    assert missing.returncode == 2 and "CONFIG" in missing.stderr

    # --dry-run, as the README says every launch script takes, is the same and never reaches main.
    flag = _bash(SLURM, "--dry-run", "--config.seed=7",
                 env=_clean_env(CONFIG="configs/c.py:big", WORKDIR="/shared/runs/x"))
    assert flag.returncode == 0, flag.stderr
    assert [l for l in flag.stdout.splitlines() if "srun" in l] == srun


# ---------------------------------------------------------------------------
# initialize().
# ---------------------------------------------------------------------------

@pytest.fixture
def calls(monkeypatch):
    """Clean environment, fresh module state and a recording jax.distributed.initialize."""
    for key in list(os.environ):
        if key.startswith(_ENV_PREFIXES) or key in _ENV_NAMES:
            monkeypatch.delenv(key)
    monkeypatch.setattr(distributed, "_initialized", False)
    recorded: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    return recorded


def _set_slurm(monkeypatch, **overrides: str) -> None:
    env = dict(SLURM_JOB_ID="77", SLURM_NTASKS="4", SLURM_PROCID="2", SLURM_LOCALID="0",
               SLURM_NODEID="2", SLURM_TASKS_PER_NODE="1(x4)",
               SLURM_STEP_NODELIST="node[01-04,07]", SLURM_JOB_NODELIST="other[1-9]")
    env.update(overrides)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_auto_without_environment_stays_single_process(calls):
    assert distributed.initialize(mode="auto") is False
    assert distributed.initialize() is False  # Flags unparsed -> auto.
    assert calls == []


def test_auto_under_slurm_derives_coordinator(calls, monkeypatch):
    _set_slurm(monkeypatch)
    assert distributed.initialize(mode="auto") is True
    assert len(calls) == 1
    kw = calls[0]
    assert kw["coordinator_address"] == "node01:12355"  # Step node list wins over job's.
    assert kw["num_processes"] == 4 and kw["process_id"] == 2
    assert kw["local_device_ids"] is None  # One task per node: all its GPUs.
    # Second call is a no-op.
    assert distributed.initialize(mode="auto") is True
    assert len(calls) == 1


def test_slurm_port_override_and_job_nodelist_fallback(calls, monkeypatch):
    _set_slurm(monkeypatch, BIFLOW_COORDINATOR_PORT="23456")
    monkeypatch.delenv("SLURM_STEP_NODELIST")
    assert distributed.initialize(mode="auto")
    assert calls[0]["coordinator_address"] == "other1:23456"


def test_slurm_one_task_per_gpu_picks_local_gpu(monkeypatch):
    env = dict(SLURM_NTASKS="8", SLURM_PROCID="6", SLURM_LOCALID="2", SLURM_NODEID="1",
               SLURM_TASKS_PER_NODE="4(x2)", SLURM_JOB_NODELIST="gpu-[3-4]")
    plan = distributed.plan_initialization("auto", env=env)
    assert plan is not None and plan.source == "slurm"
    assert plan.kwargs["local_device_ids"] == [2]
    assert plan.kwargs["coordinator_address"] == "gpu-3:12355"
    # SLURM already bound one GPU to the task: don't restrict again.
    isolated = distributed.plan_initialization("auto", env={**env, "CUDA_VISIBLE_DEVICES": "2"})
    assert isolated.kwargs["local_device_ids"] is None


def test_slurm_single_task_or_no_srun_is_not_distributed_in_auto(calls, monkeypatch):
    _set_slurm(monkeypatch, SLURM_NTASKS="1", SLURM_PROCID="0")
    assert distributed.initialize(mode="auto") is False
    _set_slurm(monkeypatch)
    monkeypatch.delenv("SLURM_PROCID")  # e.g. python run directly inside salloc.
    assert distributed.initialize(mode="auto") is False
    assert calls == []
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize(mode="on")


def test_explicit_arguments_and_modes(calls):
    assert distributed.initialize(mode="off") is False
    assert distributed.initialize("auto", "10.0.0.1:1234", 2, 1, "0,1") is True
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                          local_device_ids=[0, 1], cluster_detection_method="deactivate")]


def test_on_without_environment_lets_jax_autodetect(calls):
    assert distributed.initialize(mode="on") is True
    assert calls == [{}]


def test_tpu_pod_environment(calls, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1")
    assert distributed.initialize(mode="auto") is False  # Single-host TPU VM.
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1,t2,t3,t4")
    monkeypatch.setenv("TPU_WORKER_ID", "3")
    assert distributed.initialize(mode="auto") is True
    assert calls == [{}]
    assert distributed.tpu_pod_workers({"MEGASCALE_NUM_SLICES": "2"}) > 1
    assert distributed.tpu_pod_workers({"TPU_WORKER_ID": "0"}) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "process_id"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=-1), "process_id"),
    (dict(coordinator_address="h:1", process_id=0), "num_processes"),
    (dict(coordinator_address="h:1", num_processes=2), "process_id"),
    (dict(num_processes=2, process_id=0), "coordinator_address"),
    (dict(coordinator_address="nohost", num_processes=1, process_id=0), "host:port"),
    (dict(mode="off", coordinator_address="h:1", num_processes=2, process_id=0), "off"),
    (dict(mode="sometimes"), "mode"),
    (dict(mode="on", local_device_ids="0,x"), "local_device_ids"),
    (dict(mode="on", local_device_ids=[1, 1]), "duplicates"),
])
def test_inconsistent_arguments_raise(calls, kwargs, message):
    kwargs = {"mode": "auto", **kwargs}
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)
    assert calls == []


def test_initialize_reads_parsed_flags(calls):
    fv = flags.FLAGS
    if fv.is_parsed():
        pytest.skip("absl flags already parsed by another test")
    try:
        fv(["prog", "--coordinator_address=10.1.2.3:999", "--num_processes=3",
            "--process_id=0", "--local_device_ids=1"])
        assert distributed.initialize() is True
        assert calls[0]["coordinator_address"] == "10.1.2.3:999"
        assert (calls[0]["num_processes"], calls[0]["process_id"]) == (3, 0)
        assert calls[0]["local_device_ids"] == [1]
        fv.unparse_flags()
        fv(["prog", "--distributed=off"])
        distributed._initialized = False
        assert distributed.initialize() is False
        assert len(calls) == 1
    finally:
        fv.unparse_flags()

"""Multi-host initialisation for BiFlow training.

`biflow_jax.main` calls :func:`initialize` before touching any JAX backend,
because `jax.distributed.initialize` must run before the first device query.
The decision of *whether* to initialise is made here so that the same command
line works unchanged on a laptop, a single GPU host, a SLURM allocation and a
TPU pod:

* ``--distributed=off``  never initialise (single process).
* ``--distributed=on``   always initialise; missing coordinates are taken from
  SLURM if present, otherwise JAX's own cluster auto-detection (TPU VMs, ...).
* ``--distributed=auto`` (default) initialise only when there is evidence of a
  multi-process job: explicit ``--coordinator_address``/``--num_processes``/
  ``--process_id``, a SLURM step with ``SLURM_NTASKS > 1``, or a multi-worker
  TPU pod (``TPU_WORKER_HOSTNAMES``/``TPU_WORKER_ID``/``MEGASCALE_*``).

What a SLURM job's environment says (the coordinator host, counts, GPUs) is read by
:mod:`biflow_jax.slurm`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags, logging

from biflow_jax.slurm import int_env, slurm_info

MODES = ("auto", "on", "off")

flags.DEFINE_enum(
    "distributed", "auto", list(MODES),
    "Multi-process initialisation: 'auto' detects SLURM / TPU pods / explicit "
    "coordinator flags, 'on' always calls jax.distributed.initialize, 'off' never.")
flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator service (explicit multi-process launch).")
flags.DEFINE_integer(
    "num_processes", None, "Total number of processes in the job.", lower_bound=1)
flags.DEFINE_integer(
    "process_id", None, "Index of this process in [0, num_processes).", lower_bound=0)
flags.DEFINE_list(
    "local_device_ids", None,
    "Comma-separated local accelerator ids this process should use "
    "(default: all visible, or the SLURM local task's GPU for one task per GPU).")

FLAGS = flags.FLAGS

# Set once jax.distributed.initialize succeeded through this module.
_initialized: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    """What initialize() decided to do, kept separate so the decision is testable."""

    kwargs: dict[str, Any]
    source: str  # 'explicit', 'slurm', 'tpu' or 'jax-auto-detect'.


# --------------------------------------------------------------------------
# TPU helpers.
# --------------------------------------------------------------------------

def tpu_pod_workers(env: Mapping[str, str] | None = None) -> int:
    """Number of TPU VM workers suggested by the environment (0 if not a TPU VM).

    Any multi-slice (MEGASCALE) setting or a non-zero worker id also means a pod.
    """
    env = os.environ if env is None else env
    counts = [0]
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        if env.get(name):
            counts.append(len([h for h in env[name].split(",") if h.strip()]))
    worker_id = int_env(env, "TPU_WORKER_ID")
    if worker_id is not None:
        counts.append(worker_id + 1)
    slices = int_env(env, "MEGASCALE_NUM_SLICES")
    if (slices is not None and slices > 1) or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        counts.append(2)
    return max(counts)


# --------------------------------------------------------------------------
# Decision logic.
# --------------------------------------------------------------------------

def _normalize_local_device_ids(value: Sequence[int | str] | str | int | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        value = [value]
    elif isinstance(value, str):
        value = [v for v in value.split(",")]
    ids: list[int] = []
    for v in value:
        if isinstance(v, str):
            v = v.strip()
            if not v:
                continue
            if not re.fullmatch(r"\d+", v):
                raise ValueError(f"local_device_ids must be non-negative integers, got {v!r}")
            v = int(v)
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"local_device_ids must be non-negative integers, got {v!r}")
        ids.append(v)
    if len(set(ids)) != len(ids):
        raise ValueError(f"local_device_ids contains duplicates: {ids}")
    return ids or None


def _check_coordinator_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"coordinator_address must look like host:port (port 1-65535), got {address!r}")


def plan_initialization(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int | str] | str | int | None = None,
    env: Mapping[str, str] | None = None,
) -> Plan | None:
    """Decide whether/how to call jax.distributed.initialize; None means don't.

    Pure function of its arguments and the environment so it can be unit tested
    without starting a coordinator.
    """
    env = os.environ if env is None else env
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    if coordinator_address is not None and not coordinator_address.strip():
        coordinator_address = None
    local_ids = _normalize_local_device_ids(local_device_ids)
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))

    if mode == "off":
        if explicit:
            raise ValueError(
                "--distributed=off contradicts --coordinator_address/--num_processes/"
                "--process_id; drop those flags or use --distributed=auto|on")
        return None

    slurm = slurm_info(env)
    use_slurm = slurm is not None and (mode == "on" or slurm.num_tasks > 1)
    if use_slurm and mode == "auto" and not explicit and slurm.proc_id is None:
        # e.g. python started directly in an salloc shell rather than via srun.
        logging.warning("SLURM_NTASKS=%d but SLURM_PROCID is unset (not launched by srun); "
                        "not initialising jax.distributed.", slurm.num_tasks)
        use_slurm = False

    if explicit or use_slurm:
        source = "explicit" if explicit else "slurm"
        if slurm is not None:
            # Explicit values win; SLURM fills the gaps.
            if coordinator_address is None:
                coordinator_address = slurm.coordinator_address
            if num_processes is None:
                num_processes = slurm.num_tasks
            if process_id is None:
                process_id = slurm.proc_id
            if local_ids is None:
                local_ids = slurm.local_device_ids
        if coordinator_address is None:
            if slurm is not None:
                raise ValueError(
                    "Cannot derive the coordinator: SLURM_STEP_NODELIST/SLURM_JOB_NODELIST "
                    "is not set; pass --coordinator_address=host:port")
            raise ValueError(
                "--num_processes/--process_id were given without --coordinator_address=host:port")
        _check_coordinator_address(coordinator_address)
        if num_processes is None:
            raise ValueError(
                f"--coordinator_address={coordinator_address} was given without --num_processes")
        if process_id is None:
            raise ValueError(
                "--process_id is required with --coordinator_address/--num_processes "
                "(or run under srun so SLURM_PROCID is set)")
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"process_id must satisfy 0 <= process_id < num_processes, got "
                f"process_id={process_id}, num_processes={num_processes}")
        kwargs: dict[str, Any] = dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_ids,
            # Everything is resolved: stop JAX's own SLURM detection from forcing
            # local_device_ids=[SLURM_LOCALID] (wrong with one task per node).
            cluster_detection_method="deactivate",
        )
        return Plan(kwargs=kwargs, source=source)

    if tpu_pod_workers(env) > 1:
        # libtpu/JAX know the pod topology from the TPU VM metadata.
        return Plan(kwargs={}, source="tpu")

    if mode == "on":
        kwargs = {} if local_ids is None else {"local_device_ids": local_ids}
        return Plan(kwargs=kwargs, source="jax-auto-detect")
    return None


def _flag_value(name: str) -> Any:
    """Flag value if absl flags were parsed (i.e. called from main), else None."""
    try:
        if FLAGS.is_parsed():
            return FLAGS[name].value
    except (KeyError, AttributeError):
        pass
    return None


def _jax_already_initialized() -> bool:
    """True if jax.distributed was initialised by someone else (private API, best effort)."""
    try:
        from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
        return getattr(jax_distributed.global_state, "client", None) is not None
    except Exception:  # pragma: no cover - private API moved.
        return False


def initialize(
    mode: str | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int | str] | str | int | None = None,
) -> bool:
    """Call jax.distributed.initialize when the job is multi-process.

    Arguments left as None fall back to the absl flags (when parsed). Returns
    True if JAX is (now) running in multi-process mode through this call or an
    earlier one; calling again is a no-op.
    """
    global _initialized
    if _initialized or _jax_already_initialized():
        _initialized = True
        logging.info("jax.distributed already initialised; skipping.")
        return True

    mode = mode if mode is not None else (_flag_value("distributed") or "auto")
    if coordinator_address is None:
        coordinator_address = _flag_value("coordinator_address")
    if num_processes is None:
        num_processes = _flag_value("num_processes")
    if process_id is None:
        process_id = _flag_value("process_id")
    if local_device_ids is None:
        local_device_ids = _flag_value("local_device_ids")

    plan = plan_initialization(mode, coordinator_address, num_processes, process_id,
                               local_device_ids)
    if plan is None:
        logging.info("Single-process run (--distributed=%s, no multi-process environment).", mode)
        return False

    import jax  # pylint: disable=g-import-not-at-top

    logging.info("Initialising jax.distributed from %s: %s", plan.source, plan.kwargs)
    jax.distributed.initialize(**plan.kwargs)
    _initialized = True
    return True

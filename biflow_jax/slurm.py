"""What a SLURM job's environment says about its processes: counts, ids, the coordinator host, GPUs.

The coordinator is the first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``) on port
``$BIFLOW_COORDINATOR_PORT`` (default 12355). The compressed node list is parsed here so the
result does not depend on ``scontrol`` being installed on compute nodes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

DEFAULT_COORDINATOR_PORT = 12355



def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...] brackets."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"Unbalanced ']' in SLURM node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"Unbalanced '[' in SLURM node list {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand_range_spec(spec: str, whole: str) -> list[str]:
    """Expand the inside of one bracket, e.g. '01-04,07' -> ['01',...,'04','07']."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"Bad range {item!r} in SLURM node list {whole!r}")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"Descending range {item!r} in SLURM node list {whole!r}")
        width = len(lo_s)  # SLURM keeps the zero padding of the lower bound.
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    if not out:
        raise ValueError(f"Empty bracket in SLURM node list {whole!r}")
    return out


def _expand_host_pattern(pattern: str, whole: str) -> list[str]:
    """Expand one host pattern; several bracket groups (rack[1-2]-n[1-3]) are allowed."""
    start = pattern.find("[")
    if start < 0:
        if "]" in pattern:
            raise ValueError(f"Unbalanced ']' in SLURM node list {whole!r}")
        return [pattern]
    end = pattern.find("]", start)
    if end < 0:
        raise ValueError(f"Unbalanced '[' in SLURM node list {whole!r}")
    prefix, spec, rest = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    tails = _expand_host_pattern(rest, whole)
    return [prefix + value + tail for value in _expand_range_spec(spec, whole) for tail in tails]


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a compressed SLURM node list such as 'node[01-04,07],gpu-[3-5],a1'.

    Hosts are returned in SLURM order, so the first entry is the node that runs
    task 0 under the default block distribution (our coordinator).
    """
    if not nodelist or not nodelist.strip():
        raise ValueError("SLURM node list is empty")
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_host_pattern(pattern, nodelist))
    return hosts


def first_slurm_host(nodelist: str) -> str:
    """First host of a compressed SLURM node list (the coordinator's host)."""
    return expand_slurm_nodelist(nodelist)[0]


def parse_slurm_tasks_per_node(value: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE syntax, e.g. '4(x2),2' -> [4, 4, 2]."""
    out: list[int] = []
    for item in value.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if not m:
            raise ValueError(f"Bad SLURM tasks-per-node value {value!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def int_env(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"Environment variable {name}={raw!r} is not an integer") from None


def coordinator_port(env: Mapping[str, str] | None = None) -> int:
    """Port for the SLURM-derived coordinator: $BIFLOW_COORDINATOR_PORT or 12355."""
    env = os.environ if env is None else env
    port = int_env(env, "BIFLOW_COORDINATOR_PORT")
    if port is None:
        return DEFAULT_COORDINATOR_PORT
    if not 1 <= port <= 65535:
        raise ValueError(f"BIFLOW_COORDINATOR_PORT={port} is not a valid TCP port")
    return port


@dataclasses.dataclass(frozen=True)
class SlurmInfo:
    """The subset of the SLURM environment needed to set up jax.distributed."""

    num_tasks: int
    proc_id: int | None
    coordinator_address: str | None
    local_device_ids: list[int] | None


def _slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    """GPU for this task when SLURM runs one task per GPU, else None (all visible).

    When several tasks share a node and each still sees every GPU, task
    SLURM_LOCALID takes GPU SLURM_LOCALID. If SLURM already isolated the GPU
    (CUDA_VISIBLE_DEVICES has a single entry) there is nothing to restrict,
    and with one task per node the task should use all the node's GPUs.
    """
    local_id = int_env(env, "SLURM_LOCALID")
    if local_id is None:
        return None
    per_node_raw = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    tasks_here: int | None = None
    if per_node_raw:
        per_node = parse_slurm_tasks_per_node(per_node_raw)
        node_id = int_env(env, "SLURM_NODEID") or 0
        tasks_here = per_node[node_id] if node_id < len(per_node) else per_node[-1]
    else:
        tasks_here = int_env(env, "SLURM_NTASKS_PER_NODE")
    if tasks_here is None or tasks_here <= 1:
        return None
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) == 1:
        return None
    return [local_id]


def slurm_info(env: Mapping[str, str] | None = None) -> SlurmInfo | None:
    """Read SLURM_NTASKS/SLURM_PROCID/node list; None outside a SLURM job."""
    env = os.environ if env is None else env
    num_tasks = int_env(env, "SLURM_NTASKS")
    if num_tasks is None:
        num_tasks = int_env(env, "SLURM_NPROCS")
    if num_tasks is None:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    coordinator = f"{first_slurm_host(nodelist)}:{coordinator_port(env)}" if nodelist else None
    return SlurmInfo(
        num_tasks=num_tasks,
        proc_id=int_env(env, "SLURM_PROCID"),
        coordinator_address=coordinator,
        local_device_ids=_slurm_local_device_ids(env),
    )

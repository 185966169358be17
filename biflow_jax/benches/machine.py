"""The machine a bench ran on, read from /proc/cpuinfo, sysfs and the live process.

A CPU figure only carries to another host together with the machine it came from: the
same bench on two EPYCs of one family can differ by 2x (issue 25), so every bench puts
this record in its header and its JSON. No dependency beyond the standard library and JAX.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from typing import Any

import jax

# CPU features XLA:CPU's code generator and oneDNN dispatch on (x86; and their Arm counterparts).
RELEVANT_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni",
                  "avx512_fp16", "avx_vnni", "asimd", "sve", "sve2", "bf16", "i8mm")
PACKAGES = ("jax", "jaxlib", "flax", "torch")


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """The first processor's identity and the relevant feature flags (every `amx*` flag too)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # one processor is enough: the others repeat it
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())

    def number(key: str) -> int | None:
        value = fields.get(key, "")
        try:
            return int(value, 0)
        except ValueError:
            return None

    return {
        "cpu_model": fields.get("model name") or fields.get("Model name") or None,
        "cpu_vendor": fields.get("vendor_id") or fields.get("CPU implementer") or None,
        "cpu_family": number("cpu family"),
        "cpu_model_number": number("model") if "model" in fields else number("CPU part"),
        "cpu_stepping": number("stepping") if "stepping" in fields else number("CPU variant"),
        "cpu_flags": sorted(f for f in flags if f in RELEVANT_FLAGS or f.startswith("amx")),
    }


def parse_cache_size(text: str) -> int | None:
    """Bytes of a sysfs cache `size` ('512K', '32768K', '1M')."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", text)
    if not match:
        return None
    return int(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2)]


def cache_sizes(cpu_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """L1d / L2 / L3 bytes as cpu0 sees them (per cache instance), from sysfs; {} where unreadable."""
    sizes: dict[str, int] = {}
    try:
        entries = sorted(os.listdir(cpu_dir))
    except OSError:
        return sizes
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            with open(os.path.join(cpu_dir, entry, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(cpu_dir, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(cpu_dir, entry, "size")) as f:
                size = parse_cache_size(f.read())
        except OSError:
            continue
        if kind == "Instruction" or size is None:
            continue
        sizes["l1d_bytes" if level == "1" else f"l{level}_bytes"] = size
    return sizes


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (from package metadata: nothing is imported); None where absent."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def xla_pool_threads() -> int | None:
    """Threads of XLA:CPU's intra-op (Eigen) pool in this process, counted by name; None if there are none."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += "XLAEigen" in f.read()
        except OSError:
            continue
    return count or None


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: a container's, taskset's or Slurm's share of
    the host), which is what threads and devices should be sized to; `os.cpu_count()` counts the host's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_record() -> dict[str, Any]:
    """CPU identity, flags, cores, caches, threads, package versions and the JAX devices of this process."""
    devices = jax.devices()  # starts the backend first, so XLA's thread pool exists to be counted
    try:
        with open("/proc/cpuinfo") as f:
            record = parse_cpuinfo(f.read())
    except OSError:
        record = parse_cpuinfo("")
    record.update(cache_sizes())
    record["cores"] = usable_cores()
    record["logical_cpus"] = os.cpu_count()
    record["xla_threads"] = xla_pool_threads()
    torch = sys.modules.get("torch")  # only a bench that already uses torch has torch threads to report
    record["torch_threads"] = torch.get_num_threads() if torch is not None else None
    record["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    record["versions"] = package_versions()
    record["backend"] = jax.default_backend()
    record["device_kind"] = devices[0].device_kind
    record["device_count"] = len(devices)
    return record


def _mib(nbytes: int | None) -> str:
    if nbytes is None:
        return "?"
    return f"{nbytes / 1024**2:g} MiB" if nbytes >= 1024**2 else f"{nbytes // 1024} KiB"


def machine_line(record: dict[str, Any]) -> str:
    """One header line: `machine: AMD EPYC (AuthenticAMD family 25 model 1 stepping 1; avx2 fma), ...`."""
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
    threads = f"XLA threads {record['xla_threads'] or '?'}"
    if record.get("torch_threads") is not None:
        threads += f", torch threads {record['torch_threads']}"
    return (f"machine: {record['cpu_model'] or 'unknown CPU'} ({record['cpu_vendor'] or '?'} family "
            f"{record['cpu_family']} model {record['cpu_model_number']} stepping {record['cpu_stepping']}; "
            f"{' '.join(record['cpu_flags']) or 'no listed flags'}), {record['cores']} cores "
            f"({record['logical_cpus']} logical), L2 {_mib(record.get('l2_bytes'))}, "
            f"L3 {_mib(record.get('l3_bytes'))}; {threads}; {versions}; backend {record['backend']} "
            f"({record['device_kind']} x{record['device_count']})"
            + (f"; XLA_FLAGS={record['xla_flags']}" if record["xla_flags"] else ""))

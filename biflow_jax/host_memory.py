"""Keep freed host memory mapped, so XLA:CPU does not page-fault its buffers in every step.

Why: XLA:CPU allocates one temporary buffer per run of a compiled function; for a train
step it holds every residual of the backward pass (1.09 GB for the `bench versus_torch`
step: 3.5M params, batch 16, 256 tokens). glibc's malloc serves a block that large with a
fresh `mmap` (always, from a worker thread's arena) and `munmap`s it on free, so each step
the kernel hands out and zeroes some 280,000 fresh 4 KiB pages. Measured on the 2-core CI
machine: 0.72 s per step, ~0.45 s of it CPU time in the kernel. With one arena, no `mmap`
for large blocks and no trimming, the freed buffer is reused by the next step: 0.52 s.

The costs: the process keeps its peak heap for its lifetime instead of returning it to the
system, and XLA compiles more slowly with every thread on one arena (the imagenet64 `:p4`
train step under nn.scan: 5 -> 7.5 s). So it is applied only where XLA:CPU runs the steps:
not when JAX_PLATFORMS names an accelerator or, without JAX_PLATFORMS, when a TPU or GPU
plugin is installed and its device is present (device buffers never go through malloc there;
libtpu alone, installed to compile for TPU slices on a CPU host, changes nothing), nor for the main
tool's modes that run no step here (`process_settings.NO_STEPS`: compile, describe). `BIFLOW_KEEP_HOST_MEMORY=0`
turns it off, `=1` forces it on. It acts only on glibc (Linux); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import sys

ENV_VAR = "BIFLOW_KEEP_HOST_MEMORY"
_kept = False  # set by keep_freed_memory: whether this process runs with the settings

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")
# Device files whose presence means the plugin's accelerator is on this host (TPU VMs: /dev/accel* up to
# v4, /dev/vfio/<n> from v5e on; NVIDIA: /dev/nvidia<n>; AMD: /dev/kfd).
ACCELERATOR_DEVICES = {"libtpu": ("/dev/accel*", "/dev/vfio/[0-9]*"), "jax_cuda12_plugin": ("/dev/nvidia[0-9]*",),
                       "jax_cuda13_plugin": ("/dev/nvidia[0-9]*",), "jax_rocm60_plugin": ("/dev/kfd",),
                       "jax_rocm7_plugin": ("/dev/kfd",)}


def accelerator_present(plugin: str) -> bool:
    """An installed plugin only matters where its device is: libtpu on a CPU host (installed to compile
    for TPU slices ahead of time) leaves the steps to XLA:CPU."""
    if importlib.util.find_spec(plugin) is None:
        return False
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES[plugin])


def cpu_runs_the_steps() -> bool:
    """True when JAX will compute on the CPU: JAX_PLATFORMS is only "cpu", or it is unset and no
    accelerator plugin with its device is on this host. Decided without starting JAX."""
    platforms = [p.strip().lower() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return all(p == "cpu" for p in platforms)
    return not any(accelerator_present(name) for name in ACCELERATOR_PLUGINS)


def kept() -> bool:
    """Whether keep_freed_memory took in this process (the command-line tools call it; importing does not)."""
    return _kept


def keep_freed_memory() -> bool:
    """Set glibc's malloc to one arena, no mmap'd blocks and no trimming; True if it took.

    A process-wide setting, so only the command-line entry points (biflow_jax.cli) call it: a
    library user who imports biflow_jax (or biflow_jax.torch) keeps the process's own malloc.
    Call it before JAX first runs anything: a thread that has already allocated keeps its
    own arena, and XLA's worker threads start with the first computation. The trim
    threshold is passed as -1, which glibc reads as SIZE_MAX (never trim).
    """
    global _kept
    choice = os.environ.get(ENV_VAR, "")
    if choice == "0" or not sys.platform.startswith("linux") or (choice != "1" and not cpu_runs_the_steps()):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    _kept = all(mallopt(param, value) == 1 for param, value in settings)
    return _kept

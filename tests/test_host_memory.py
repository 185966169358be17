"""host_memory: the command-line tools keep freed host memory mapped (glibc), so a large block
freed by one step is reused by the next without page faults; BIFLOW_KEEP_HOST_MEMORY=0 opts out.
Importing the library (biflow_jax, biflow_jax.torch) changes neither malloc nor the environment.

Each case runs in a fresh interpreter (malloc settings are per process and must precede any
allocation by a worker thread). The probe mallocs and writes 64 MiB in a worker thread, frees
it, and does it again, counting the minor page faults of the second round: a fresh mapping
costs one fault per page (16,384 with 4 KiB pages), a reused heap block almost none. The checks
compare the two rounds, so they hold with transparent huge pages too.
"""

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, os, resource, sys, threading
    environ = dict(os.environ)
    for module in sys.argv[1:]:
        __import__(module)
    from biflow_jax import host_memory
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    faults = []

    def one_round():
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)

    def worker():
        one_round()
        one_round()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    print(host_memory.kept(), faults[0], faults[1], dict(os.environ) == environ)
""")
ENTRY_POINT = "biflow_jax.cli.bench"  # what `python -m biflow_jax.bench` runs first

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")


def _probe(keep: str, platforms: str = "cpu", imports: tuple[str, ...] = (ENTRY_POINT,)) -> tuple[str, int, int]:
    env = {**os.environ, "BIFLOW_KEEP_HOST_MEMORY": keep, "JAX_PLATFORMS": platforms}
    out = subprocess.run([sys.executable, "-c", PROBE, *imports], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_an_entry_point_makes_a_freed_block_reusable_without_page_faults():
    kept, first, second = _probe("")
    assert kept == "True"
    assert first > 0  # the first touch of 64 MiB faults page by page
    assert second * 10 < first, f"a freed 64 MiB block faulted again: {first} then {second} page faults"


def test_opting_out_leaves_glibc_defaults():
    kept, first, second = _probe("0")
    assert kept == "False"
    assert first > 0
    assert second * 2 > first, f"glibc unmaps a freed 64 MiB block: expected ~{first} faults again, got {second}"


@pytest.mark.parametrize("platforms, want", [("tpu", "False"), ("cuda,cpu", "False"), ("cpu", "True")])
def test_applied_only_where_the_cpu_runs_the_steps(platforms, want):
    """On an accelerator host device buffers never go through malloc, and one arena would only slow compiles."""
    assert _probe("", platforms)[0] == want


def test_importing_the_library_leaves_malloc_and_the_environment_alone():
    """A PyTorch user who imports biflow_jax.torch keeps glibc's defaults: a freed 64 MiB block is unmapped."""
    pytest.importorskip("torch")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("BIFLOW_KEEP_HOST_MEMORY", None)  # the default, which an entry point would apply
    out = subprocess.run([sys.executable, "-c", PROBE, "biflow_jax", "biflow_jax.torch"], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    kept, first, second, same_env = out[0], int(out[1]), int(out[2]), out[3]
    assert kept == "False" and same_env == "True"
    assert first > 0
    assert second * 2 > first, f"importing biflow_jax changed malloc: {first} then {second} page faults"


@pytest.mark.parametrize("argv, want", [(["--mode=compile"], "False"), (["--mode", "describe"], "False"),
                                        (["--mode=train"], "True"), ([], "True")])
def test_main_keeps_memory_only_for_modes_that_run_steps_here(argv, want):
    """`--mode=compile` only compiles (for a TPU slice) and `describe` only traces: one malloc arena would
    slow XLA's compiler threads and save nothing."""
    code = ("import sys; sys.argv = ['main'] + sys.argv[1:]; import biflow_jax.cli.main; "
            "from biflow_jax import host_memory; print(host_memory.kept())")
    env = {**os.environ, "BIFLOW_KEEP_HOST_MEMORY": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    assert out[-1] == want

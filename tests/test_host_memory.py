"""host_memory: importing biflow_jax keeps freed host memory mapped (glibc), so a large block
freed by one step is reused by the next without page faults; BIFLOW_KEEP_HOST_MEMORY=0 opts out.

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
    import ctypes, ctypes.util, resource, threading
    import biflow_jax
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
    print(biflow_jax.HOST_MEMORY_KEPT, faults[0], faults[1])
""")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")


def _probe(keep: str, platforms: str = "cpu") -> tuple[str, int, int]:
    env = {**os.environ, "BIFLOW_KEEP_HOST_MEMORY": keep, "JAX_PLATFORMS": platforms}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_importing_biflow_jax_makes_a_freed_block_reusable_without_page_faults():
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

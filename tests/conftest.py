"""The suite's environment (quiet TensorFlow, CPU, exact float32 matmuls) and its fixtures; nothing else.

Tests mirror the package (tests/models, tests/objectives, ...); this directory is on sys.path
for all of them: shared builders are in tests/helpers (tiny configs, random params), other
helper modules beside the tests (torch_reference, multidevice_steps, ...).
"""

import os
import sys
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite is compile-bound with tiny steps: biflow_jax's one-arena malloc setting (host_memory)
# only slows XLA's compiles here (suite ~6% slower); tests/test_host_memory.py checks it in
# subprocesses that set this variable themselves.
os.environ.setdefault("BIFLOW_KEEP_HOST_MEMORY", "0")
# The suite computes on the CPU even where libtpu is installed (the test extras bring it for the
# ahead-of-time TPU compile tests, which need no TPU backend): without this, JAX would first try
# to start a TPU runtime and print libtpu's warnings into every subprocess's stderr.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache per test run, shared by the xdist workers and every subprocess
# they start (they inherit the variable): the suite compiles the same tiny programs (the digits
# flow's train step, its sampler, ...) in many processes, and a cached executable is the one a fresh
# compile would give. The run's first process (the xdist controller, or pytest alone) names a fresh
# folder; a folder named by the caller is kept.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="biflow-test-xla-cache-")
    os.environ["BIFLOW_TEST_OWNS_XLA_CACHE"] = "1"
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The suite's compile flags (-O0, classic fusion emitters: tests/helpers/compile_flags.py says why) for
# every process of the run; a test that needs other flags sets XLA_FLAGS itself.
from helpers.compile_flags import with_suite_flags  # noqa: E402

os.environ["XLA_FLAGS"] = with_suite_flags(os.environ.get("XLA_FLAGS", ""))
# torchvision's compiled detection operators do not load beside the CPU build of torch this
# project pins, and transformers/diffusers import torchvision whenever it is installed; the
# reference models need only its Python layers (see torch_reference.py).
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

# Exact float32 matmuls, in this process and in every subprocess a test starts (the CLI runs inherit the
# variable): the same setting on both sides gives the same HLO, so a CLI run finds the programs an
# in-process run of the same config compiled in the shared cache above (test_trainer's SIGKILL test:
# 134.7 s -> 109.6 s of CPU).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])

from helpers.paths import REPO  # noqa: E402

if REPO not in sys.path:
    sys.path.insert(0, REPO)  # configs/ for tests in subfolders


@pytest.fixture
def repo_root() -> str:
    return REPO


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks into node ids
def pytest_collection_modifyitems(config, items):
    """Scheduling under `-n N --dist loadgroup` (setup.cfg): each module's tests share one worker, so a
    module-scoped fixture (the multi-process runs of test_sharding, the trained runs of test_trainer)
    is built once; a test marked `one_per_worker_slot` (each walk of tests/test_config_walk.py, a minute
    or more apiece) is a group of its own, so the walks spread over the workers."""
    for item in items:
        own = item.get_closest_marker("one_per_worker_slot") is not None
        item.add_marker(pytest.mark.xdist_group(item.nodeid if own else item.module.__name__))


def pytest_unconfigure(config):
    """The run's first process removes the compilation cache it made (workers leave it to it)."""
    if os.environ.get("BIFLOW_TEST_OWNS_XLA_CACHE") == "1" and "PYTEST_XDIST_WORKER" not in os.environ:
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

"""The XLA flags every process of the suite compiles with (set by tests/conftest.py).

The suite is compile-bound and its tiny programs compile faster than they then run slower, so:
LLVM's backend optimisation off (-O0; tests/test_faults.py with tests/objectives/test_perceptual.py:
140 s -> 118 s), and XLA's classic elemental IR emitters for loop fusions in place of the newer MLIR
fusion emitters (tests/models/test_tarflow_fast_paths.py: 82 s -> 61 s of CPU, 2-core Xeon family 6
model 207). Every comparison a test makes is between programs compiled with the same flags.
"""

SUITE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def with_suite_flags(flags: str = "") -> str:
    """`flags` plus each suite flag it does not set itself."""
    for flag in SUITE_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    return flags


def host_devices(count: int, default_emitters: bool = False) -> str:
    """XLA_FLAGS for a subprocess that simulates `count` CPU devices, compiled as the suite compiles;
    `default_emitters` keeps XLA's own fusion emitters (for a bitwise comparison made under them)."""
    kept = [f for f in SUITE_FLAGS if not (default_emitters and f.startswith("--xla_cpu_use_fusion_emitters"))]
    return " ".join([f"--xla_force_host_platform_device_count={count}", *kept])

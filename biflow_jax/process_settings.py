"""What a command-line tool sets for its whole process, once, before JAX starts a backend.

Only the entry points (`biflow_jax.cli`) call `apply`; importing the library changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from biflow_jax import host_memory, tpu_slices

# Modes that run no step on this host's CPU: `compile` only compiles (for a TPU slice), `describe`
# only traces shapes. One malloc arena slows XLA's compiler threads (a TPU compile by 15-25%).
NO_STEPS = ("compile", "describe")


def mode_in(argv: Sequence[str]) -> str | None:
    """The value of --mode in a command line (`--mode=X` or `--mode X`), read before absl parses it."""
    for i, arg in enumerate(argv):
        if arg.startswith("--mode="):
            return arg.split("=", 1)[1]
        if arg == "--mode" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def apply(argv: Sequence[str] = ()) -> None:
    """Keep freed host memory mapped (`host_memory`) unless the command line's mode runs no step here,
    and, where libtpu is installed on a host with no TPU (the `tpu` and `test` extras bring it for
    `--mode=compile`), tell it so, so that starting JAX's backends does not print libtpu's search for a
    TPU into every run's stderr."""
    if mode_in(argv) not in NO_STEPS:
        host_memory.keep_freed_memory()
    tpu_slices.quiet_libtpu()

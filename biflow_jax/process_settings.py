"""What a command-line tool sets for its whole process, once, before JAX starts a backend.

Only the entry points (`biflow_jax.cli`) call `apply`; importing the library changes nothing.
"""

from __future__ import annotations

from biflow_jax import host_memory, tpu_slices


def apply() -> None:
    """Keep freed host memory mapped (`host_memory`), and, where libtpu is installed on a host with
    no TPU (the `tpu` and `test` extras bring it for `--mode=compile`), tell it so, so that starting
    JAX's backends does not print libtpu's search for a TPU into every run's stderr."""
    host_memory.keep_freed_memory()
    tpu_slices.quiet_libtpu()

"""Which platform a program is being built for, so kernels are chosen for the devices that run it.

A program compiled ahead of time for a TPU slice is traced on a CPU host, where
`jax.default_backend()` says "cpu"; a kernel chosen from it would put the CPU path into the
TPU program. The answer, in order: a `compiling_for(platform)` context (set by
`--mode=compile` around every lowering), the platform of the mesh a `shard_map` is tracing
over, and only then the host's default backend (pmap, plain jit on local devices).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("biflow_target_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Trace everything inside for `platform` ('cpu', 'gpu' or 'tpu').

    JAX's trace caches do not know this setting, so a function traced before for another platform
    would come back with that platform's kernels: the caches are cleared on the way in and out.
    """
    jax.clear_caches()
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
        jax.clear_caches()


def target_platform() -> str:
    """The platform the program being traced will run on."""
    explicit = _TARGET.get()
    if explicit is not None:
        return explicit
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None)
    if platform:
        return "gpu" if platform in ("cuda", "rocm") else platform
    return jax.default_backend()

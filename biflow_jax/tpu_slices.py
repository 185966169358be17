"""TPU slices by name (`v5e:2x4`, `v4:2x2x4`, ...) as device lists to compile for, on any host.

libtpu compiles for a TPU topology ahead of time without a TPU (`jax.experimental.topologies`),
so a program's per-chip HBM and FLOPs are known before a pod is rented. A chip's usable HBM is
the figure XLA itself checks against ("available HBM" in its out-of-memory error, measured
with libtpu 0.0.42.1); peak bf16 FLOP/s are the vendor's per-chip figures.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from biflow_jax.errors import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    usable_hbm: int  # bytes XLA lets one chip's program use
    peak_bf16_flops: float  # per chip, per second
    chip_config: str  # libtpu's name for one JAX device per chip
    chips_per_host: int
    axes: int  # 2 (v5e, v6e: AxB) or 3 (v4, v5p: AxBxC)


CHIPS = {
    "v4": Chip("v4", int(30.75 * GiB), 275e12, "megacore", 4, 3),
    "v5e": Chip("v5e", int(15.75 * GiB), 197e12, "default", 4, 2),
    "v5p": Chip("v5p", int(95.74 * GiB), 459e12, "default", 4, 3),
    "v6e": Chip("v6e", int(31.25 * GiB), 918e12, "default", 4, 2),
}

# Slice shapes a lab rents: single-host ones first, then multi-host pods.
KNOWN = {
    "v4": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8"),
    "v5e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v5p": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4"),
    "v6e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
}
KNOWN_NAMES = tuple(f"{gen}:{shape}" for gen, shapes in KNOWN.items() for shape in shapes)


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    chip: Chip
    shape: tuple[int, ...]
    devices: tuple[Any, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def num_hosts(self) -> int:
        return len({d.process_index for d in self.devices})


def parse(name: str) -> tuple[Chip, tuple[int, ...]]:
    """'v5e:2x4' -> (the v5e chip, (2, 4)); anything not in KNOWN_NAMES is a ConfigError listing them."""
    if name not in KNOWN_NAMES:
        raise ConfigError(f"unknown TPU topology {name!r}; known: {', '.join(KNOWN_NAMES)}")
    gen, shape = name.split(":")
    return CHIPS[gen], tuple(int(s) for s in shape.split("x"))


def host_bounds(chip: Chip, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Chips per host as libtpu's (x, y, z): v5e/v6e slices of up to 8 chips sit on one host (v5litepod-8,
    v6e-8), larger ones and every v4/v5p slice on hosts of 2x2 chips."""
    chips = math.prod(shape)
    if chip.axes == 2 and chips <= 8:
        return (shape[0], shape[1], 1)
    return (min(2, shape[0]), min(2, shape[1]), 1)


def quiet_libtpu() -> None:
    """Compiling for a topology starts libtpu's runtime, which looks for this host's TPU and warns
    when it finds none, and takes a lock that one process at a time may hold; on a host that is not a
    TPU VM, say that it is a lone host and that the lock is not needed."""
    if os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio"):
        return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiling processes (pytest -n 2)


def get(name: str) -> Slice:
    """The slice's devices (one per chip), ready for `Mesh`; needs libtpu (`pip install -e ".[tpu]"`)."""
    chip, shape = parse(name)
    try:
        from jax.experimental import topologies
    except ImportError as err:  # pragma: no cover - part of every jax release we pin
        raise ConfigError(f"this jax has no ahead-of-time topologies: {err}") from None
    quiet_libtpu()
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name=chip.chip_config,
                                            chips_per_host_bounds=host_bounds(chip, shape), num_slices=1)
    except (RuntimeError, ValueError) as err:
        if "libtpu" in str(err).lower() or "tpu" in str(err).lower():
            raise ConfigError(f"compiling for {name} needs libtpu (pip install -e \".[tpu]\"): "
                              f"{str(err).splitlines()[0]}") from None
        raise
    devices = tuple(topo.devices)
    if len(devices) != math.prod(shape):
        raise ConfigError(f"libtpu describes {name} with {len(devices)} devices, expected {math.prod(shape)} chips")
    return Slice(name, chip, shape, devices)

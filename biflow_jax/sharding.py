"""How the one per-device train step runs on many devices: the `config.parallel` modes.

`trainer.device_step` is written once, per device, with named-axis collectives over the
mesh's batch axis. This module runs it three ways and hides the differences from the
training loop behind `ParallelStep`:

- `replicated_jit` (backend 'jit', the default): `shard_map` under `jit`; the state is a
  global array replicated on every device, the batch is split over the mesh.
- `pmapped` (backend 'pmap'): the classic `jax.pmap` of the same step; the state carries a
  leading axis with one replica per local device and each process feeds its local batch.
- `fully_sharded` (backend 'jit' with fsdp=True): params, EMA and optimizer state sharded
  over the mesh (`fsdp_shardings`). The global step is `vmap(device_step)` with
  `spmd_axis_name`, jitted with GSPMD: XLA's partitioner all-gathers the params for the
  forward, reduces the gradients onto their shards (an all-reduce and a slice on CPU, which
  the GPU/TPU pipelines can turn into a reduce-scatter) and runs the optimizer shard-wise,
  including optax's global-norm clip (which a hand-written shard_map would compute on one
  shard only). The step itself is the same `device_step`, so the modes cannot drift apart.
  Between steps a device holds 1/N of the state; within one it holds the gathered params
  and the gradients whole (no per-layer gathering).

Checkpoints only ever see global arrays (`ParallelStep.from_backend`): replicated, or
sharded in fsdp mode. Orbax restores them into whatever shardings the target asks for,
so a run saved in one mode or device count resumes in any other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"  # the mesh's one axis: the batch is split along it

# Leaves with fewer elements stay replicated in fsdp mode: gathering them costs more than they weigh.
MIN_SHARDED_ELEMENTS = 1024


@dataclasses.dataclass(frozen=True)
class ParallelStep:
    """A train step and the conversions between the loop's global arrays and the step's layout.

    The loop keeps the state in the backend's layout between steps and converts only to
    evaluate or save: `state = to_backend(state)` once, then `state, metrics = step(state,
    put_batch(local_numpy_batch), frozen)`; `from_backend(tree)` gives global arrays of any part
    of the state. For jit both conversions are the identity.
    """

    run: Callable[[Any, Any, Any], tuple[Any, dict]]
    to_backend: Callable[[Any], Any]
    from_backend: Callable[[Any], Any]
    put_batch: Callable[[dict[str, np.ndarray]], Any]

    def __call__(self, state: Any, batch: Any, frozen: Any = None) -> tuple[Any, dict]:
        """frozen: untrained params the loss reads (replicated global arrays), or None."""
        return self.run(state, batch, frozen)


def batch_axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"expected a 1-D data mesh, got axes {mesh.axis_names}")
    return mesh.axis_names[0]


def global_batch_putter(mesh: Mesh) -> Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]:
    """Process-local numpy batch -> one global array split over the mesh."""
    sharding = NamedSharding(mesh, P(batch_axis(mesh)))
    return lambda batch: to_global(batch, sharding)


def make_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over every device of every process; the batch is split along it."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), (AXIS,))


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global jax.Arrays sharded over the mesh's batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def example_keys(rng: jax.Array, index: jax.Array) -> jax.Array:
    """One key per example from its global index: the same noise on 1 or 1000 devices."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)


def identity(tree: Any) -> Any:
    return tree


def replicated_jit(device_step: Callable, mesh: Mesh) -> ParallelStep:
    """shard_map + jit: state replicated, batch split over the mesh, state buffers donated.

    check_vma=False keeps pmap's per-device semantics, which device_step is written for: with
    it on, differentiating through the replicated params already psums the gradients over the
    mesh, and the step's own pmean would leave them N times the mean on N devices.
    """
    axis = batch_axis(mesh)
    sharded = jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P(axis), P()), out_specs=(P(), P()),
                            check_vma=False)
    return ParallelStep(jax.jit(sharded, donate_argnums=0), identity, identity, global_batch_putter(mesh))


def pmapped(device_step: Callable, mesh: Mesh) -> ParallelStep:
    """jax.pmap over the mesh's devices: one state replica per local device (leading axis).

    Each process passes arrays whose leading axis is its own devices; the collectives in
    the step still span every process. Metrics are pmean'd in the step, so they come back
    once (out_axes=None), not per device.
    """
    axis = batch_axis(mesh)
    devices = tuple(mesh.devices.flat)
    local = [d for d in devices if d.process_index == jax.process_index()]
    run = jax.pmap(device_step, axis_name=axis, in_axes=(0, 0, None), out_axes=(0, None), devices=devices,
                   donate_argnums=0)
    local_sharding = NamedSharding(Mesh(np.asarray(local), (axis,)), P(axis))
    replicated = NamedSharding(mesh, P())

    def to_backend(tree):
        # Start-up only (after init or restore): through the host, which every process can read.
        def put(x):
            x = np.asarray(jax.device_get(x))
            return jax.device_put(np.broadcast_to(x[None], (len(local),) + x.shape), local_sharding)

        return jax.tree_util.tree_map(put, tree)

    def from_backend(tree):
        # Replica i lives on local device i: reuse it as that device's copy of a global array.
        def take(x):
            shape = x.shape[1:]
            copies = [s.data.reshape(shape) for s in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(shape, replicated, copies)

        return jax.tree_util.tree_map(take, tree)

    def put_batch(batch):  # (local batch, ...) -> (local devices, per device, ...); pmap copies it over
        return {k: v.reshape((len(local), v.shape[0] // len(local)) + v.shape[1:]) for k, v in batch.items()}

    return ParallelStep(run, to_backend, from_backend, put_batch)


def fsdp_spec(shape: tuple[int, ...], num_devices: int, axis: str) -> P:
    """Shard the largest dimension divisible by the device count; small or indivisible leaves replicate."""
    if num_devices == 1 or math.prod(shape) < MIN_SHARDED_ELEMENTS:
        return P()
    divisible = [d for d, size in enumerate(shape) if size % num_devices == 0]
    if not divisible:
        return P()
    dim = max(divisible, key=lambda d: (shape[d], -d))  # the earliest of equally large dimensions
    return P(*[axis if d == dim else None for d in range(len(shape))])


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) under fsdp_spec."""
    axis = batch_axis(mesh)
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), mesh.size, axis)), tree)


def replicated_shardings(tree: Any, mesh: Mesh) -> Any:
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), tree)


def fully_sharded(device_step: Callable, mesh: Mesh) -> ParallelStep:
    """The global step under GSPMD, with the state stored in fsdp_shardings between steps.

    vmap over a leading device axis (named like the mesh axis, so the step's pmean and
    axis_index keep their meaning) and `spmd_axis_name` pin every per-device value to its
    device; the state is unbatched, so XLA decides the gathers and reductions it needs.
    """
    axis = batch_axis(mesh)
    n = mesh.size
    per_device = jax.vmap(device_step, in_axes=(None, 0, None), out_axes=(None, None), axis_name=axis,
                          spmd_axis_name=axis)

    def global_step(state, batch, frozen):
        split = jax.tree_util.tree_map(lambda v: v.reshape((n, v.shape[0] // n) + v.shape[1:]), batch)
        state, metrics = per_device(state, split, frozen)
        return jax.lax.with_sharding_constraint(state, fsdp_shardings(state, mesh)), metrics

    run = jax.jit(global_step, donate_argnums=0)
    return ParallelStep(run, lambda tree: jax.device_put(tree, fsdp_shardings(tree, mesh)), identity,
                        global_batch_putter(mesh))

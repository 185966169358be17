"""Training loop for the forward flow: one jitted step on a device mesh, Orbax, clu metrics.

The step is written once, per device, with named-axis collectives over the batch
axis 'data'; `make_train_step` runs it as config.parallel asks (biflow_jax.sharding):
`shard_map` under `jit` (the default, for TPU pods and GPUs), `pmap`, or fully sharded
(fsdp). Every example draws its noise from a key folded with its global index, so
results do not depend on how the batch is split over devices.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from biflow_jax import checkpoint, likelihood, sharding
from biflow_jax.config_checks import validate_config
from biflow_jax.data import input_pipeline
from biflow_jax.models.gaussian import DiagonalGaussian
from biflow_jax.models.tarflow import build_flow, count_params

AXIS = "data"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    nonfinite: jax.Array  # steps whose loss was not finite since the start


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from init_lr, then cosine decay to end_lr (ml-tarflow's schedule)."""
    o, steps = config.optim, config.train.steps
    warmup = optax.linear_schedule(o.init_lr, o.lr, max(o.warmup_steps, 1))
    decay_steps = max(steps - o.warmup_steps, 1)
    cosine = optax.cosine_decay_schedule(o.lr, decay_steps, alpha=o.end_lr / o.lr if o.lr else 0.0)
    return optax.join_schedules([warmup, cosine], [o.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    parts.append(optax.adamw(make_schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
    return optax.chain(*parts)


def make_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over every device of every process; the batch is split along it."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), (AXIS,))


def example_keys(rng: jax.Array, index: jax.Array) -> jax.Array:
    """One key per example from its global index: the same noise on 1 or 1000 devices."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the loop trains: fresh trainable params, the per-device loss, and where the flow is.

    loss(params, batch, rng, index) -> (scalar, metrics) for this device's slice of the batch,
    `index` being the examples' global indices (draw per-example noise from them).
    flow_params(params) -> the forward flow's variables inside the trainable params (for eval).
    frozen: params that are used but not trained (stage 2's forward flow, a DINO encoder). They
    are passed to the jitted step as an argument, not baked into it as constants, and reach
    `loss` as a fifth argument when not None.
    """

    init: Callable[[jax.Array], Any]
    loss: Callable
    flow_params: Callable[[Any], Any] = lambda params: params
    frozen: Any = None


def flow_inputs(config: ml_collections.ConfigDict, batch: dict, keys: jax.Array):
    """(x~, y): noised/dequantised images and labels with dropout; keys (N, 2) per example."""
    t = config.train
    x = jax.vmap(lambda k, im: likelihood.augment(k, im, t.noise, t.noise_std))(keys[:, 0], batch["image"])
    y = None
    if config.model.num_classes:
        drop = jax.vmap(lambda k: jax.random.uniform(k) < t.label_drop)(keys[:, 1])
        y = jnp.where(drop, -1, batch["label"])
    return x, y


def flow_objective(model, config: ml_collections.ConfigDict) -> Objective:
    """Maximum likelihood of the forward flow: NLL per dim on a batch of uint8 images."""

    def loss_fn(params, batch, rng, index):
        keys = jax.vmap(lambda k: jax.random.split(k, 2))(example_keys(rng, index))
        x, y = flow_inputs(config, batch, keys)
        out = model.apply(params, x, y)
        loss = likelihood.nll_loss(out.z, out.logdets)
        return loss, {"loss": loss, "logdet": jnp.mean(jnp.sum(out.logdets, -1)),
                      "z_sq": jnp.mean(jnp.square(out.z))}

    return Objective(init=lambda rng: model.init(rng, *checkpoint.example_inputs(config)), loss=loss_fn)


def make_objective(model, config: ml_collections.ConfigDict) -> Objective:
    """The objective a config asks for."""
    if "align" in config and config.align.enabled:  # R-REPA: NLL + alignment with a frozen DINOv2
        from biflow_jax.objectives import rrepa

        return rrepa.make_objective(model, config)
    return flow_objective(model, config)


def device_step(state: TrainState, batch: dict, frozen: Any = None, *, loss_fn: Callable, optimizer,
                ema_decay: float, seed: int) -> tuple[TrainState, dict]:
    """One optimisation step on this device's slice of the batch; gradients are averaged over AXIS."""
    n = batch["image"].shape[0]
    index = jax.lax.axis_index(AXIS) * n + jnp.arange(n)
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    extra = () if frozen is None else (frozen,)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng, index, *extra)
    grads = jax.lax.pmean(grads, AXIS)
    metrics = jax.lax.pmean(metrics, AXIS)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))  # warm up the average
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    bad = jnp.logical_not(jnp.isfinite(jax.lax.pmean(loss, AXIS))).astype(jnp.int32)
    return TrainState(state.step + 1, params, opt_state, ema, state.nonfinite + bad), metrics


def make_train_step(loss_fn: Callable, optimizer, config: ml_collections.ConfigDict,
                    mesh: Mesh) -> sharding.ParallelStep:
    """device_step run the way config.parallel asks: step(state, batch, frozen=None), state donated.

    The state and batch are in the backend's layout: the loop converts once with
    `step.to_backend(state)`, feeds `step.put_batch(local numpy batch)` and takes
    `step.from_backend(tree)` to evaluate or save (both identities for jit; see biflow_jax.sharding).
    """
    step = functools.partial(device_step, loss_fn=loss_fn, optimizer=optimizer,
                             ema_decay=config.train.ema_decay, seed=config.train.seed)
    backend, fsdp = config.parallel.backend, config.parallel.get("fsdp", False)
    if backend == "jit":
        return sharding.fully_sharded(step, mesh) if fsdp else sharding.replicated_jit(step, mesh)
    if backend == "pmap":
        if fsdp:
            raise ValueError("sharding.fsdp=True needs sharding.backend='jit' (pmap keeps a whole state per device)")
        return sharding.pmapped(step, mesh)
    raise ValueError(f"sharding.backend={backend!r} is not supported (use 'jit' or 'pmap')")


def fresh_state(objective: Objective, optimizer, config: ml_collections.ConfigDict) -> TrainState:
    params = objective.init(jax.random.key(config.train.seed))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), params, jnp.zeros((), jnp.int32))


def init_state(objective: Objective, optimizer, config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
    """Fresh parameters as global arrays: replicated over the mesh, or sharded with sharding.fsdp.

    Created in place with their final shardings, so an fsdp state never exists whole on one device.
    """
    init = functools.partial(fresh_state, objective, optimizer, config)
    return jax.jit(init, out_shardings=state_shardings(jax.eval_shape(init), config, mesh))()


def abstract_state(objective: Objective, optimizer, config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
    """What init_state would return, as ShapeDtypeStructs with shardings: a restore target that
    costs neither compiling nor running the initialiser, in any device count or parallel mode."""
    shapes = jax.eval_shape(functools.partial(fresh_state, objective, optimizer, config))
    return jax.tree_util.tree_map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                  shapes, state_shardings(shapes, config, mesh))


def state_shardings(state: Any, config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
    """Where each leaf of a (possibly abstract) train state lives between steps, per config.parallel."""
    if config.parallel.get("fsdp", False):
        return sharding.fsdp_shardings(state, mesh)
    return sharding.replicated_shardings(state, mesh)


def make_eval_fn(apply_fn: Callable, mesh: Mesh, seed: int) -> Callable:
    """Jitted per-example bits/dim of a batch under uniform dequantisation (fixed noise).

    apply_fn(params, x, y) -> (z, logdets): the flow, or any baseline with the same outputs.
    """
    batch_sharding = NamedSharding(mesh, P(AXIS))

    @functools.partial(jax.jit, in_shardings=(None, batch_sharding, batch_sharding, None))
    def bpd(params, images, labels, offset):
        index = offset + jnp.arange(images.shape[0])
        keys = example_keys(jax.random.key(seed + 7919), index)
        x = jax.vmap(likelihood.uniform_dequantize)(keys, images)
        z, logdets = apply_fn(params, x, labels)
        return likelihood.bits_per_dim(z, logdets)

    return bpd


def flow_apply(model) -> Callable:
    def apply(params, x, y):
        out = model.apply(params, x, y if model.num_classes else None)
        return out.z, out.logdets

    return apply


def evaluate_bpd(bpd_fn: Callable, config: ml_collections.ConfigDict, mesh: Mesh, params: Any,
                 split: str | None = None) -> float:
    """Mean test bits/dim over a whole split."""
    sharding = NamedSharding(mesh, P(AXIS))
    total, count, offset = 0.0, 0, 0
    for batch in input_pipeline.eval_batches(config, split):
        g = input_pipeline.to_global(batch, sharding)
        # The whole global batch on every process (device_get cannot read other processes' shards).
        values = multihost_utils.process_allgather(bpd_fn(params, g["image"], g["label"], offset), tiled=True)
        mask = multihost_utils.process_allgather(g["mask"], tiled=True)
        total += float(values[mask].sum())
        count += int(mask.sum())
        offset += len(mask)
    return total / max(count, 1)


def gaussian_baseline_bpd(config: ml_collections.ConfigDict, mesh: Mesh) -> float:
    """Bits/dim of a diagonal Gaussian fitted to the dequantised training set, same eval path."""
    images, _ = input_pipeline.split_arrays(config, config.data.train_split)
    x = likelihood.uniform_dequantize(jax.random.key(config.train.seed), jnp.asarray(images))
    baseline = DiagonalGaussian.fit(np.asarray(x), config.model.patch_size)
    bpd_fn = make_eval_fn(lambda params, x, y: baseline(x), mesh, config.train.seed)
    return evaluate_bpd(bpd_fn, config, mesh, {})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Stage 1: train (or resume) the forward flow in `workdir`; returns the final metrics."""
    validate_config(config)
    input_pipeline.dataset_info(config.data)  # a missing dataset fails here, before the workdir is touched
    mesh = make_mesh()
    model = build_flow(config.model)
    objective = make_objective(model, config)
    bpd_fn = make_eval_fn(flow_apply(model), mesh, config.train.seed)

    def evaluate(ema_params):
        return {"test_bpd": evaluate_bpd(bpd_fn, config, mesh, objective.flow_params(ema_params))}

    return run_training(config, workdir, objective, evaluate, mesh, same_run_keys=("model", "data.name"))


def run_training(config: ml_collections.ConfigDict, workdir: str, objective: Objective,
                 evaluate: Callable[[Any], dict[str, float]], mesh: Mesh,
                 same_run_keys: tuple[str, ...]) -> dict[str, float]:
    """The loop both stages share: resume, jitted steps, logging, eval with EMA params, Orbax.

    A workdir holding a run whose config differs in any of `same_run_keys` is refused.
    """
    optimizer = make_optimizer(config)
    is_main = jax.process_index() == 0

    mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints)
    latest = mngr.latest_step()
    if latest is not None:
        saved = checkpoint.read_config(workdir)
        diffs = []
        for key in same_run_keys:
            diffs += checkpoint.section_differences({key: lookup(saved, key)}, {key: lookup(config, key)}, "")
        if diffs:
            raise ValueError(f"workdir {workdir!r} holds a run of another configuration: " + "; ".join(diffs))
    checkpoint.write_config(workdir, config)
    if latest is None:
        state = init_state(objective, optimizer, config, mesh)
    else:  # straight into this run's shardings, whatever the mode and device count of the saving run
        target = abstract_state(objective, optimizer, config, mesh)
        params, ema, opt_state, meta = checkpoint.restore(mngr, latest, target.params, target.ema_params,
                                                          target.opt_state)
        state = TrainState(jnp.asarray(meta["step"], jnp.int32), params, opt_state, ema, jnp.zeros((), jnp.int32))
        logging.info("resumed from step %d", meta["step"])
    start = int(state.step)

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if start == 0:
        writer.write_hparams({"num_params": count_params(state.params), **flat_config(config)})
    report = periodic_actions.ReportProgress(num_train_steps=config.train.steps, writer=writer)
    train_step = make_train_step(objective.loss, optimizer, config, mesh)
    frozen = None if objective.frozen is None else jax.device_put(objective.frozen, NamedSharding(mesh, P()))
    batches = input_pipeline.train_batches(config, position=start)
    say(f"training {count_params(state.params):,} params from step {start} to {config.train.steps} "
        f"on {jax.device_count()} device(s)")
    state = train_step.to_backend(state)  # pmap: one replica per local device; jit: as is

    results: dict[str, float] = {}
    for step in range(start + 1, config.train.steps + 1):
        batch = train_step.put_batch(next(batches))
        state, metrics = train_step(state, batch, frozen)
        report(step)
        if step % config.train.log_every == 0 or step == config.train.steps:
            metrics = jax.device_get(metrics)  # the loop's only host sync, besides eval and saving
            check_finite(state, step)
            writer.write_scalars(step, metrics)
            say(f"step {step}: loss {metrics['loss']:.4f} grad_norm {metrics['grad_norm']:.3f}")
        if step % config.train.eval_every == 0 or step == config.train.steps:
            results = evaluate(train_step.from_backend(state.ema_params))
            writer.write_scalars(step, {f"{k}_ema": v for k, v in results.items()})
            say(f"step {step}: " + ", ".join(f"{k} (EMA) {v:.4f}" for k, v in results.items()))
        if step % config.train.checkpoint_every == 0 or step == config.train.steps:
            check_finite(state, step)
            saved = train_step.from_backend(state)  # global arrays, whatever the backend
            checkpoint.save(mngr, step, saved.params, saved.ema_params, saved.opt_state, data_position=step)
    mngr.wait_until_finished()
    mngr.close()
    if not results:  # the run was already complete: report its final state
        results = evaluate(train_step.from_backend(state.ema_params))
    writer.flush()
    return results


def lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value.get(part) if hasattr(value, "get") else None
    return value


def check_finite(state: TrainState, step: int) -> None:
    if int(np.max(jax.device_get(state.nonfinite))):  # pmap: one count per device
        raise TrainingError(f"the loss became NaN/inf before step {step}; stopping without saving "
                            "(the last good checkpoint is kept). Lower optim.lr or set optim.grad_clip.")


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, (dict, ml_collections.ConfigDict)):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(config, "")
    return out


def say(message: str) -> None:
    """Progress for a person at the console (process 0 only)."""
    if jax.process_index() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
    logging.info(message)

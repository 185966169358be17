"""The one training loop for every stage: jitted steps on a device mesh, EMA, Orbax, evaluators.

Reads top to bottom: `run` gets an Objective (what to optimise, biflow_jax.objectives), a
list of evaluators (biflow_jax.evaluators) and the stage's name, which only picks the stage's
own `train` / `optim` config sections (`loop_sections`) and is recorded in the workdir's
stage.json; which checkpoints are kept is `checkpoint_keeper`'s rule. The step is written once, per
device, with named-axis collectives; `sharding.py` runs it as `shard_map` under `jit`,
`pmap`, or fully sharded. Every example draws its noise from a key folded with its
global index, so results do not depend on how the batch is split over devices.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metric_writers, periodic_actions
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from biflow_jax import checkpoint, optim, provenance, runs, sharding, workdir_lock
from biflow_jax.checkpoint_keeper import CheckpointKeeper, check_finite
from biflow_jax.console import is_main_process, say
from biflow_jax.data import input_pipeline
from biflow_jax.errors import require
from biflow_jax.models.param_trees import count_params
from biflow_jax.objectives import Objective


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    nonfinite: jax.Array  # steps whose loss was not finite since the start


def loop_sections(config: ml_collections.ConfigDict, stage: str) -> tuple[ml_collections.ConfigDict, ...]:
    """(train, optim) sections of a stage: stage 1 uses the top-level ones, stage 2 `biflow.*`."""
    if stage == "biflow":
        return config.biflow.train, config.biflow.optim
    return config.train, config.optim


def device_step(state: TrainState, batch: dict, frozen: Any = None, *, loss_fn: Callable, optimizer,
                ema_decay: float, ema_warmup: bool, seed: int) -> tuple[TrainState, dict]:
    """One optimisation step on this device's slice of the batch; gradients are averaged over the mesh."""
    axis = sharding.AXIS
    n = batch["image"].shape[0]
    index = jax.lax.axis_index(axis) * n + jnp.arange(n)
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    extra = () if frozen is None else (frozen,)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng, index, *extra)
    grads = jax.lax.pmean(grads, axis)
    metrics = jax.lax.pmean(metrics, axis)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.update_ema(state.ema_params, params, optim.ema_decay_at(state.step, ema_decay, ema_warmup))
    metrics["grad_norm"] = optax.tree.norm(grads)
    bad = jnp.logical_not(jnp.isfinite(jax.lax.pmean(loss, axis))).astype(jnp.int32)
    return TrainState(state.step + 1, params, opt_state, ema, state.nonfinite + bad), metrics


def make_train_step(loss_fn: Callable, optimizer, train: ml_collections.ConfigDict,
                    parallel: ml_collections.ConfigDict, mesh: Mesh) -> sharding.ParallelStep:
    """device_step run the way `parallel` asks: step(state, batch, frozen=None), state donated.

    The loop converts once with `step.to_backend(state)`, feeds `step.put_batch(local numpy batch)`
    and takes `step.from_backend(tree)` to evaluate or save (identities for jit).
    """
    step = functools.partial(device_step, loss_fn=loss_fn, optimizer=optimizer, ema_decay=train.ema_decay,
                             ema_warmup=train.get("ema_warmup", True), seed=train.seed)
    if parallel.backend == "pmap":  # `parallel` is checked once, by config_checks.validate_parallel
        return sharding.pmapped(step, mesh)
    return sharding.fully_sharded(step, mesh) if parallel.get("fsdp", False) else sharding.replicated_jit(step, mesh)


def fresh_state(objective: Objective, optimizer, seed: int) -> TrainState:
    params = objective.init(jax.random.key(seed))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), params, jnp.zeros((), jnp.int32))


def state_shardings(state: Any, parallel: ml_collections.ConfigDict, mesh: Mesh) -> Any:
    """Where each leaf of a (possibly abstract) train state lives between steps."""
    if parallel.get("fsdp", False):
        return sharding.fsdp_shardings(state, mesh)
    return sharding.replicated_shardings(state, mesh)


def init_state(objective: Objective, optimizer, seed: int, parallel: ml_collections.ConfigDict,
               mesh: Mesh) -> TrainState:
    """Fresh parameters as global arrays, created in place with their final shardings."""
    init = functools.partial(fresh_state, objective, optimizer, seed)
    return jax.jit(init, out_shardings=state_shardings(jax.eval_shape(init), parallel, mesh))()


def abstract_state(objective: Objective, optimizer, seed: int, parallel: ml_collections.ConfigDict,
                   mesh: Mesh) -> TrainState:
    """What init_state would return, as ShapeDtypeStructs with shardings: a restore target in any
    device count or parallel mode that costs neither compiling nor running the initialiser."""
    shapes = jax.eval_shape(functools.partial(fresh_state, objective, optimizer, seed))
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  shapes, state_shardings(shapes, parallel, mesh))


def lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value.get(part) if hasattr(value, "get") else None
    return value


OFF_VALUES = (False, None, "none", "", 0, 0.0, [], ())


def check_same_run(workdir: str, config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
    """A workdir holding a run whose config differs in any of `keys` is refused."""
    saved = runs.read_config(workdir)
    diffs = []
    for key in keys:
        diffs += checkpoint.section_differences({key: lookup(saved, key)}, {key: lookup(config, key)}, "")
    # An option added since the run was saved is no difference while it keeps its "off" value.
    diffs = [d for d in diffs if not any(d.endswith(f"'<absent>' -> {off!r}") for off in OFF_VALUES)]
    if diffs:
        raise ValueError(f"workdir {workdir!r} holds a run of another configuration: " + "; ".join(diffs))


def run(objective: Objective, evaluators: Sequence[Any], config: ml_collections.ConfigDict, workdir: str,
        stage: str, mesh: Mesh | None = None, flow_workdir: str | None = None) -> dict[str, float]:
    """`train_locked` as the one writer of `workdir` (WorkdirBusyError while another live run owns it)."""
    on_damaged = loop_sections(config, stage)[0].get("on_damaged_checkpoint", "fallback")
    require(on_damaged in ("fallback", "stop"), f"on_damaged_checkpoint={on_damaged!r} must be 'fallback' or 'stop'")
    checkpoint.check_path(workdir)
    with workdir_lock.hold(workdir):
        return train_locked(objective, evaluators, config, workdir, stage, mesh, flow_workdir)


def train_locked(objective: Objective, evaluators: Sequence[Any], config: ml_collections.ConfigDict, workdir: str,
                 stage: str, mesh: Mesh | None = None, flow_workdir: str | None = None) -> dict[str, float]:
    """Train (or resume) one stage in `workdir`; returns the last evaluation's figures.

    evaluators: objects with `.name`, `.every` (steps; 0 = only at the end) and
    `__call__(ema_params) -> dict[str, float]`, run with the EMA params.
    """
    train, optim_cfg = loop_sections(config, stage)
    mesh = mesh or sharding.make_mesh()
    optimizer = optim.make_optimizer(optim_cfg, train.steps)

    mngr = checkpoint.manager(workdir, keep=None)  # pruned by the CheckpointKeeper, once a step is verified
    latest = mngr.latest_step()
    if latest is not None:
        check_same_run(workdir, config, objective.same_run_keys)
    checkpoint.write_config(workdir, config)
    runs.write_stage_file(workdir, stage, objective.name, flow_workdir)
    provenance.record(workdir)
    if latest is None:
        state = init_state(objective, optimizer, train.seed, config.parallel, mesh)
    else:  # straight into this run's shardings, whatever the mode and device count of the saving run
        target = abstract_state(objective, optimizer, train.seed, config.parallel, mesh)
        read = functools.partial(checkpoint.restore, mngr, params=target.params, ema_params=target.ema_params,
                                 opt_state=target.opt_state)
        latest, (params, ema, opt_state, meta) = checkpoint.restore_newest_readable(
            mngr, lambda s: read(step=s), f"workdir {workdir!r}", train.get("on_damaged_checkpoint", "fallback"),
            then="; the damaged step is deleted")
        for damaged in [s for s in mngr.all_steps() if s > latest]:  # this run saves those steps again
            mngr.delete(damaged)
        state = TrainState(jnp.asarray(meta["step"], jnp.int32), params, opt_state, ema, jnp.zeros((), jnp.int32))
    start = int(state.step)

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main_process())
    num_params = count_params(state.params)
    if start == 0:
        writer.write_hparams({"num_params": num_params, **flat_config(config)})
    report = periodic_actions.ReportProgress(num_train_steps=train.steps, writer=writer)
    schedule = optim.make_schedule(optim_cfg, train.steps)
    train_step = make_train_step(objective.loss, optimizer, train, config.parallel, mesh)
    frozen = None if objective.frozen is None else jax.device_put(objective.frozen, NamedSharding(mesh, P()))
    batches = input_pipeline.train_batches(config.data, train.batch_size, train.seed, position=start)
    say(f"{stage} stage ({objective.name}): training {num_params:,} params from step {start} to {train.steps} "
        f"on {jax.device_count()} device(s)")
    state = train_step.to_backend(state)  # pmap: one replica per local device; jit: as is

    def evaluate(step: int, final: bool) -> dict[str, float]:
        due = [e for e in evaluators if final or (e.every and step % e.every == 0)]
        if not due:
            return {}
        ema_params = train_step.from_backend(state.ema_params)
        figures: dict[str, float] = {}
        for evaluator in due:
            figures.update(evaluator(ema_params))
        writer.write_scalars(step, {f"eval/{k}": v for k, v in figures.items()})
        say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()) + " (EMA params)")
        return figures

    results: dict[str, float] = {}
    pace = Pace(start, train.steps)
    keeper = CheckpointKeeper(mngr, train.keep_checkpoints, restored=None if latest is None else start)
    for step in range(start + 1, train.steps + 1):
        batch = train_step.put_batch(next(batches))
        state, metrics = train_step(state, batch, frozen)
        report(step)
        keeper.after_step(state, step)
        if step % train.log_every == 0 or step == train.steps:
            metrics = jax.device_get(metrics)  # the loop's only host sync, besides eval and saving
            check_finite(state, step)
            lr = float(schedule(step - 1))  # the rate this step's update used
            writer.write_scalars(step, {**{f"train/{k}": v for k, v in metrics.items()}, "train/learning_rate": lr})
            say(f"step {step}/{train.steps}: loss {metrics['loss']:.4f} grad_norm {metrics['grad_norm']:.3f} "
                f"lr {lr:.2e} | {pace(step)}")
        if step % train.checkpoint_every == 0 or step == train.steps:  # before evaluating: a failing evaluator
            keeper.save(step, state, train_step.from_backend)  # (a test image that does not decode) loses nothing
        results = evaluate(step, final=step == train.steps) or results
    mngr.wait_until_finished()
    if not results:  # the run was already complete: report its final state
        results = evaluate(train.steps, final=True)
    if keeper.waiting:  # the final save: its loss is the next step's, taken here and not applied
        state, _ = train_step(state, train_step.put_batch(next(batches)), frozen)  # `state` is not used after
        keeper.after_step(state, train.steps + 1)
    mngr.close()
    writer.flush()
    return results


class Pace:
    """'12.3 steps/s, ETA 4m05s' from the wall time between log lines (evaluation and saving included)."""

    def __init__(self, start: int, total: int):
        self.step, self.time, self.total = start, time.perf_counter(), total

    def __call__(self, step: int) -> str:
        now = time.perf_counter()
        rate = (step - self.step) / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        eta = int(round((self.total - step) / rate)) if rate > 0 else 0
        return f"{rate:.1f} steps/s, ETA {eta // 3600}h{eta // 60 % 60:02d}m" if eta >= 3600 else \
            f"{rate:.1f} steps/s, ETA {eta // 60}m{eta % 60:02d}s"




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

"""Stage 2 of BiFlow: learn the reverse model G from the frozen forward flow's trajectory.

The forward flow F comes from a stage-1 workdir and is never trained here: its
parameters reach the jitted step as frozen arguments, and its trajectory
x^0 = x~, x^1, ..., x^B = z is computed inside the step under stop_gradient. G maps z
to every x^i (hidden alignment) and finally to the clean image (learned denoising).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from biflow_jax import checkpoint, likelihood, train
from biflow_jax.config_checks import ConfigError, require, validate_config
from biflow_jax.data import input_pipeline
from biflow_jax.models.reverse import ReverseViT, build_reverse
from biflow_jax.models.tarflow import TARFlow, patchify
from biflow_jax.reverse_objective import OBJECTIVES, guided_training_outputs

# Sections of a stage-2 config that must agree with the stage-1 run it builds on.
MATCHING_DATA_KEYS = ("name", "image_size", "channels", "num_classes")


def load_forward(config: ml_collections.ConfigDict) -> tuple[TARFlow, Any]:
    """The frozen stage-1 flow (EMA params) named by config.forward_workdir, checked against config."""
    workdir = config.get("forward_workdir") or ""
    require(bool(workdir), "stage 2 needs config.forward_workdir: the workdir of a finished stage-1 run")
    try:
        saved, flow, params = checkpoint.load_flow(workdir, ema=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the stage-1 flow named by forward_workdir cannot be loaded: {e}") from e
    diffs = checkpoint.section_differences(saved.model, config.model, "model.")
    diffs += checkpoint.section_differences({k: saved.data.get(k) for k in MATCHING_DATA_KEYS},
                                            {k: config.data.get(k) for k in MATCHING_DATA_KEYS}, "data.")
    if diffs:
        raise ConfigError(f"the stage-1 run in {workdir!r} does not match this config (stage-1 value -> this "
                          "config's): " + "; ".join(diffs))
    return flow, params


def validate_reverse_config(config: ml_collections.ConfigDict) -> None:
    validate_config(config)
    rt = config.reverse_train
    require(rt.objective in OBJECTIVES, f"reverse_train.objective={rt.objective!r} must be one of {sorted(OBJECTIVES)}")
    require(0.0 <= rt.w_min <= rt.w_max, f"reverse_train.w_min={rt.w_min} / w_max={rt.w_max} must satisfy 0 <= min <= max")
    require(not rt.cfg_training or config.model.num_classes > 0,
            "reverse_train.cfg_training needs a class-conditional flow (model.num_classes > 0)")


def build_models(config: ml_collections.ConfigDict, flow: TARFlow) -> ReverseViT:
    return build_reverse(config.reverse, flow.num_tokens, flow.token_dim, flow.num_blocks)


def biflow_objective(flow: TARFlow, flow_params: Any, reverse: ReverseViT,
                     config: ml_collections.ConfigDict) -> train.Objective:
    """Hidden alignment + learned denoising (+ training-time CFG), PAPERS.md section 3."""
    rt = config.reverse_train
    conditional = config.model.num_classes > 0
    loss_terms = OBJECTIVES[rt.objective]

    def init(rng):
        z = jnp.zeros((1, flow.num_tokens, flow.token_dim))
        return reverse.init(rng, z, jnp.zeros((1,), jnp.int32) if conditional else None, jnp.zeros((1,)))

    def loss(params, batch, rng, index, frozen):
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(train.example_keys(rng, index))
        x, y = train.flow_inputs(config, batch, keys[:, :2])
        trajectory = jax.lax.stop_gradient(flow.apply(frozen["flow"], x, y).trajectory)
        clean = patchify(likelihood.to_unit_range(batch["image"]), flow.patch_size)

        def apply(z, labels, w):
            return reverse.apply(params, z, labels, w)

        if rt.cfg_training:
            w = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, rt.w_min, rt.w_max))(keys[:, 2])
            stages = guided_training_outputs(apply, trajectory[-1], y, w)
        else:
            stages = apply(trajectory[-1], y, None).stage_outputs
        terms = loss_terms(stages, trajectory, clean, final_target="clean", adaptive=rt.adaptive,
                           p=rt.adaptive_p, c=rt.adaptive_c)
        metrics = {k.replace("/", "_"): v for k, v in terms.items() if k != "total"}
        metrics["loss"] = terms["total"]
        return terms["total"], metrics

    return train.Objective(init=init, loss=loss, flow_params=lambda params: None, frozen={"flow": flow_params})


def make_reconstruction_eval(flow: TARFlow, reverse: ReverseViT, mesh: Mesh) -> Callable:
    """Per-example MSE of G(F(x)) against the clean x: how well G inverts F on held-out data."""
    batch_sharding = NamedSharding(mesh, P(train.AXIS))

    @jax.jit
    def mse(params, flow_params, images, labels):
        x = likelihood.to_unit_range(images)
        y = labels if flow.num_classes else None
        z = flow.apply(flow_params, x, y).z
        out = reverse.apply(params, z, y, None).image_tokens
        return jnp.mean(jnp.square(out - patchify(x, flow.patch_size)), axis=(1, 2))

    def evaluate(params, flow_params, config):
        total, count = 0.0, 0
        for batch in input_pipeline.eval_batches(config):
            g = input_pipeline.to_global(batch, batch_sharding)
            # The whole global batch on every process (device_get cannot read other processes' shards).
            values = multihost_utils.process_allgather(mse(params, flow_params, g["image"], g["label"]), tiled=True)
            mask = multihost_utils.process_allgather(g["mask"], tiled=True)
            total += float(values[mask].sum())
            count += int(mask.sum())
        return total / max(count, 1)

    return evaluate


def stage2_config(config: ml_collections.ConfigDict, forward_workdir: str | None = None) -> ml_collections.ConfigDict:
    """The config stage 2 runs with: steps and learning rate from reverse_train, stage 'biflow'."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.stage = "biflow"
    if forward_workdir is not None:
        config.forward_workdir = forward_workdir
    config.train.steps = config.reverse_train.steps
    config.optim.lr = config.reverse_train.lr
    config.optim.warmup_steps = min(config.optim.warmup_steps, config.train.steps // 10)
    config.train.eval_every = min(config.train.eval_every, config.train.steps)
    return config


def train_reverse(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Stage 2: train (or resume) G in `workdir` against the frozen flow of config.forward_workdir."""
    config = stage2_config(config)
    validate_reverse_config(config)
    input_pipeline.dataset_info(config.data)
    flow, flow_params = load_forward(config)
    reverse = build_models(config, flow)
    mesh = train.make_mesh()
    objective = biflow_objective(flow, flow_params, reverse, config)
    recon = make_reconstruction_eval(flow, reverse, mesh)

    def evaluate(ema_params):
        return {"test_recon_mse": recon(ema_params, flow_params, config)}

    return train.run_training(config, workdir, objective, evaluate, mesh,
                              same_run_keys=("model", "reverse", "data.name", "reverse_train.objective"))


def load_reverse(workdir: str, ema: bool = True):
    """(config, reverse model, params, flow, flow params) of a finished stage-2 workdir."""
    config = checkpoint.read_config(workdir)
    if config.get("stage") != "biflow":
        raise ValueError(f"workdir {workdir!r} is not a stage-2 (BiFlow) run")
    flow, flow_params = load_forward(config)
    reverse = build_models(config, flow)
    mngr = checkpoint.manager(workdir, async_save=False)
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"stage-2 workdir {workdir!r} has no checkpoint yet")
    restored = checkpoint.restore_item(mngr, step, "ema_params" if ema else "params")
    mngr.close()
    init = biflow_objective(flow, flow_params, reverse, config).init
    checkpoint.check_tree(jax.eval_shape(init, jax.random.key(0)), restored, f"checkpoint {workdir!r} step {step}")
    return config, reverse, restored, flow, flow_params

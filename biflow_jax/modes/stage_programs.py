"""Every program a training stage runs, built from abstract state: nothing materialised, no weights read.

`--mode=compile` lowers these for a TPU slice. Each stage contributes its real train step
(`trainer.make_train_step` under `config.parallel`, with EMA, optimizer and the frozen
networks the objective reads: DINOv2 for R-REPA, the flow / LPIPS / ConvNeXt-V2 / VAE decoder
for BiFlow's stage 2) and the programs its evaluators and samplers run: the FID sampling
chunk of the cached exact inverse (stage 1) or of 1-NFE G (stage 2), and the FID Inception
features of one chunk. Frozen networks get their published architectures (SD-VAE ft-EMA,
VGG16-LPIPS, ConvNeXt-V2-Base, DINOv2 of `align.encoder`) with ShapeDtypeStruct params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from biflow_jax import latent_space, model_flops, objectives, optim, runs, sharding, trainer
from biflow_jax.evaluators import inception_features, sample_fid
from biflow_jax.models import registry
from biflow_jax.models.inception import parameter_shapes
from biflow_jax.objectives import alignment_teachers, biflow, flow, perceptual, rrepa

PROGRAMS = {"flow": ("train_step", "exact_inverse", "fid_inception"), "biflow": ("train_step", "one_nfe")}
STORE_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program of a stage: `lower()` gives its jax Lowered; `images` per call (global)."""

    stage: str
    name: str
    images: int
    lower: Callable[[], Any]
    analytic_flops: float | None  # model FLOPs per call, all chips together


def abstract(tree: Any, sharding_: Any) -> Any:
    """ShapeDtypeStructs of a tree's leaves (arrays or structs) placed with one sharding."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), tree)


def batch_spec(config: ml_collections.ConfigDict, batch_size: int, mesh: Mesh) -> dict[str, Any]:
    """What the input pipeline feeds a step: uint8 images (or latent posteriors) and int32 labels."""
    split = NamedSharding(mesh, P(sharding.AXIS))
    data = config.data
    if latent_space.enabled(config):
        dtype = STORE_DTYPES[config.latent.get("store_dtype", "float16")]
        shape = (batch_size, data.image_size, data.image_size, data.channels)
        return {"image": jax.ShapeDtypeStruct(shape, dtype, sharding=split),
                latent_space.STD_KEY: jax.ShapeDtypeStruct(shape, dtype, sharding=split),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=split)}
    shape = (batch_size, data.image_size, data.image_size, data.channels)
    return {"image": jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=split),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=split)}


def abstract_decoder(config: ml_collections.ConfigDict) -> latent_space.LatentDecoder | None:
    """The SD-VAE (ft-EMA architecture) decoder of a latent config, params abstract."""
    if not latent_space.enabled(config):
        return None
    from biflow_jax.models.vae import AutoencoderKL, vae_config

    latent = config.latent
    model = AutoencoderKL(vae_config("sd-vae-ft-ema", dtype=latent.get("vae_dtype", "float32")))
    z = jax.ShapeDtypeStruct((1, config.data.image_size, config.data.image_size, config.data.channels), jnp.float32)
    params = jax.eval_shape(lambda latents: model.init(jax.random.key(0), latents, method=model.decode), z)["params"]
    return latent_space.LatentDecoder(model, params, float(latent.scale), float(latent.shift),
                                      int(latent.get("decode_batch", 64)))


def abstract_teacher(align: ml_collections.ConfigDict) -> alignment_teachers.Teacher:
    """R-REPA's frozen DINOv2 of `align.encoder`, params abstract."""
    from biflow_jax.models.dino import Dinov2, dinov2_config

    teachers = alignment_teachers
    cfg = (teachers.tiny_encoder_config() if align.encoder == teachers.TINY_ENCODER
           else dinov2_config(align.encoder, align.registers))
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[align.dtype]
    image = jax.ShapeDtypeStruct((1, cfg.patch_size, cfg.patch_size, 3), jnp.float32)
    params = jax.eval_shape(Dinov2(cfg).init, jax.random.key(0), image)["params"]
    return alignment_teachers.Teacher(Dinov2(cfg, dtype), params, int(align.resolution))


def abstract_flow_params(config: ml_collections.ConfigDict, model: Any) -> Any:
    x, y = registry.flow_example_inputs(config.model)
    return jax.eval_shape(lambda x, y: model.init(jax.random.key(0), x, y), x, y)


def train_program(stage: str, config: ml_collections.ConfigDict, objective: objectives.Objective, mesh: Mesh,
                  analytic: float | None) -> Program:
    train, optim_cfg = trainer.loop_sections(config, "biflow" if stage == "biflow" else "flow")
    optimizer = optim.make_optimizer(optim_cfg, train.steps)
    step = trainer.make_train_step(objective.loss, optimizer, train, config.parallel, mesh)
    replicated = NamedSharding(mesh, P())

    def lower():
        state = trainer.abstract_state(objective, optimizer, train.seed, config.parallel, mesh)
        batch = batch_spec(config, train.batch_size, mesh)
        frozen = None if objective.frozen is None else abstract(objective.frozen, replicated)
        return step.run.lower(state, batch, frozen)  # jit / fsdp only: compile.run refuses pmap first

    return Program(stage, "train_step", train.batch_size, lower,
                   None if analytic is None else analytic * train.batch_size)


def sampler_program(stage: str, sampler: sample_fid.Sampler, params: Any, batch_size: int, mesh: Mesh,
                    analytic: float | None) -> Program:
    split, replicated = NamedSharding(mesh, P(sharding.AXIS)), NamedSharding(mesh, P())

    def lower():
        index = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=split)
        return sampler.generate.lower(abstract(params, replicated), index, index)

    name = "exact_inverse" if sampler.name == "exact" else "one_nfe"
    return Program(stage, name, batch_size, lower, None if analytic is None else analytic * batch_size)


def inception_program(stage: str, settings: dict[str, Any], image_shape: tuple[int, int, int],
                      mesh: Mesh) -> Program:
    split, replicated = NamedSharding(mesh, P(sharding.AXIS)), NamedSharding(mesh, P())
    batch = int(settings["batch_size"])

    def lower():
        variables = {c: {} for c in parameter_shapes()}
        for collection, shapes in parameter_shapes().items():
            for path, shape in shapes.items():
                *parents, leaf = path.split("/")
                node = variables[collection]
                for name in parents:
                    node = node.setdefault(name, {})
                node[leaf] = jax.ShapeDtypeStruct(tuple(shape), jnp.float32, sharding=replicated)
        images = jax.ShapeDtypeStruct((batch,) + image_shape, jnp.uint8, sharding=split)
        return inception_features._features.lower(variables, images, size=int(settings["inception_size"]),
                                                  convention=settings["convention"])

    return Program(stage, "fid_inception", batch, lower, None)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """The shape of a generated image as FID sees it: decoded RGB for latent runs."""
    if latent_space.enabled(config):
        size = int(config.latent.source.image_size)
        return (size, size, 3)
    return (config.data.image_size, config.data.image_size, config.data.channels)


def flow_stage(config: ml_collections.ConfigDict, mesh: Mesh) -> list[Program]:
    """Stage 1: the NLL (or R-REPA) train step, the exact inverse's FID chunk and its Inception features."""
    model = registry.build_flow(config.model)
    decoder = abstract_decoder(config)
    name = objectives.stage_objective_name(config, "flow")
    if name == "rrepa":
        rrepa.validate_align(config)  # the weights-file half of rrepa.validate does not apply: nothing is read
        objective = rrepa.make(config, model, teacher=abstract_teacher(config.align), decoder=decoder)
    else:
        objective = flow.make(config, model)
    forward = model_flops.flow_forward(model)
    settings = sample_fid.fid_settings(config, "flow")
    sampler = sample_fid.exact_sampler(model, config, config, settings, decoder)
    flow_params = abstract_flow_params(config, model)
    params = flow_params if decoder is None else (flow_params, decoder.params)
    guided = 2 if (config.sample.guidance and model.num_classes) else 1
    return [train_program("flow", config, objective, mesh, 3 * forward),
            sampler_program("flow", sampler, params, int(settings["batch_size"]), mesh, guided * forward),
            inception_program("flow", settings, image_shape(config), mesh)]


def biflow_stage(config: ml_collections.ConfigDict, mesh: Mesh) -> list[Program]:
    """Stage 2: G's train step against the frozen flow (+ perceptual terms, VAE) and 1-NFE G's FID chunk."""
    model = registry.build_flow(config.model)
    flow_run = runs.FlowRun("(abstract stage-1 run)", config, model, abstract_flow_params(config, model), 0)
    b = config.biflow
    weighting = (lambda d: biflow.adaptive_weight(d, b.adaptive_p, b.adaptive_c)) if b.adaptive else None
    built = perceptual.build_abstract(b.perceptual, weighting) if "perceptual" in b else None
    decoder = abstract_decoder(config)
    objective = biflow.make(config, flow_run, perceptual_terms=built, decoder=decoder)
    reverse = biflow.build_reverse(config, model)
    g_forward = model_flops.reverse_forward(reverse)
    g_train = (3 + (1 if b.cfg_training else 0)) * g_forward + model_flops.flow_forward(model)
    settings = sample_fid.fid_settings(config, "biflow")
    sampler = sample_fid.biflow_sampler(reverse, model, config, settings, decoder)
    g_params = jax.eval_shape(objective.init, jax.random.key(0))
    params = g_params if decoder is None else (g_params, decoder.params)
    programs = [train_program("biflow", config, objective, mesh, g_train if built is None else None),
                sampler_program("biflow", sampler, params, int(settings["batch_size"]), mesh, g_forward)]
    return programs


def stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The stages `--mode=compile` builds: those the config trains ('both': both; a paper config that
    names stage 1 also has a full stage-2 section, compiled too)."""
    return ("flow", "biflow") if config.stage in ("flow", "both") else ("biflow",)


def programs(config: ml_collections.ConfigDict, mesh: Mesh, stage: str) -> list[Program]:
    return flow_stage(config, mesh) if stage == "flow" else biflow_stage(config, mesh)

"""R-REPA: align flow hidden states with frozen DINOv2 patch features (arXiv:2511.22345).

Loss = NLL + align.weight * mean over locations of -mean_p cos(v_p, proj(h)_p), where v
are DINOv2 patch tokens of the clean image and h the hidden state after layer l of flow
block t (1-indexed in forward order, as in the paper: blocks 7 & 8, layer 6 -> [(7, 6), (8, 6)]).

The pieces: frozen teachers (`alignment_teachers`), the projector (`models/repa_projector`),
which hidden is matched with which patch under which gradient mode (`alignment_features`).
This module checks the `align` section and builds the objective.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from biflow_jax import architecture, latent_space, likelihood
from biflow_jax.config_checks import validate_flow_stage
from biflow_jax.errors import require
from biflow_jax.models import registry
from biflow_jax.models.repa_projector import Projector
from biflow_jax.models.tarflow import TARFlow
from biflow_jax.objectives import Objective
from biflow_jax.objectives.alignment_features import (
    GRADIENT_MODES,
    Location,
    alignment_hiddens,
    alignment_loss,
    forward_pass,
    location_name,
)
from biflow_jax.objectives.alignment_teachers import (
    ENCODERS,
    TINY_ENCODER,
    ConstantTeacher,
    Teacher,
    make_teacher,
    missing_weights_message,
)
from biflow_jax.objectives.flow import flow_inputs
from biflow_jax.sharding import example_keys


def parse_locations(locations: Sequence[Sequence[int]]) -> tuple[Location, ...]:
    """Config locations (lists from JSON or tuples) -> sorted unique (block, layer) pairs."""
    return tuple(sorted({(int(b), int(l)) for b, l in locations}))


def validate_align(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the key of any unusable `align` value."""
    a, m = config.align, config.model
    require(a.mode in GRADIENT_MODES, f"align.mode={a.mode!r} must be one of {GRADIENT_MODES}")
    require(a.reverse_passes in (1, 2), f"align.reverse_passes={a.reverse_passes} must be 1 or 2")
    require(len(a.locations) > 0, "align.locations is empty: give (block, layer) pairs, 1-indexed")
    for location in a.locations:
        require(len(location) == 2, f"align.locations entry {location!r} is not a (block, layer) pair")
        block, layer = location
        require(1 <= block <= m.num_blocks,
                f"align.locations block {block} is outside 1..model.num_blocks={m.num_blocks} (1-indexed)")
        layers = architecture.layer_counts(m.num_blocks, m.layers_per_block, m.get("block_layers", ()) or ())
        if len(layers) != m.num_blocks:
            continue  # a malformed model.block_layers is named when the flow is built
        require(1 <= layer <= layers[block - 1],
                f"align.locations layer {layer} is outside 1..{layers[block - 1]}, the layers of block {block} "
                "(model.layers_per_block / model.block_layers; 1-indexed)")
    require(a.weight >= 0, f"align.weight={a.weight} must be >= 0")
    require(a.projector_hidden > 0, f"align.projector_hidden={a.projector_hidden} must be positive")
    require(a.encoder in ENCODERS, f"align.encoder={a.encoder!r} must be one of {ENCODERS}")
    require(a.dtype in ("float32", "bfloat16"), f"align.dtype={a.dtype!r} must be 'float32' or 'bfloat16'")
    require(a.resolution >= 14, f"align.resolution={a.resolution} is smaller than one 14-pixel DINO patch")
    require(m.in_channels in (1, 3) or latent_space.enabled(config),
            f"alignment needs 1- or 3-channel images (or latents, latent.enabled), model.in_channels={m.in_channels}")
    require(not (a.encoder == TINY_ENCODER and not a.random_init),
            "align.encoder='tiny' exists only with align.random_init=True")


# ---------------------------------------------------------------------------
# The training objective.

def validate(config: ml_collections.ConfigDict) -> None:
    """Config checks, and the DINOv2 weights exist: a missing file stops the run before it writes."""
    validate_flow_stage(config)  # latent_space.validate runs once, in modes.train.validate
    validate_align(config)
    align = config.align
    if not align.weights and not align.random_init:
        raise FileNotFoundError(missing_weights_message(align))
    if align.weights and not os.path.exists(os.path.expanduser(align.weights)):
        raise FileNotFoundError(f"align.weights={align.weights!r} does not exist. " + missing_weights_message(align))


def make(config: ml_collections.ConfigDict, model: TARFlow | None = None,
         teacher: Teacher | ConstantTeacher | None = None,
         decoder: latent_space.LatentDecoder | None = None) -> Objective:
    """NLL + align.weight * alignment; trainable params {'flow': flow vars, 'projectors': {...}}.

    `teacher` (`apply(params, uint8 images)` -> (N, grid*grid, width) features, with
    `params`, `grid` and `width`) defaults to the encoder the config names; it is loaded here, so a missing weights file
    fails before any training. Benchmarks pass a ConstantTeacher to time the alignment
    without the encoder. The config's checks are `validate`'s (the trainer runs it before
    the workdir is touched); callers that skip it call `validate_align` themselves.
    """
    model = model or registry.build_flow(config.model)
    align = config.align
    if teacher is None:
        teacher = make_teacher(align, config.train.seed)
    grid, width = teacher.grid, teacher.width
    locations = parse_locations(align.locations)
    projector = Projector(int(align.projector_hidden), width)
    mode, passes, weight = align.mode, int(align.reverse_passes), float(align.weight)
    decoder = decoder or latent_space.load_decoder(config)  # `decoder`: a built one (abstract params in compile mode)
    frozen = {"teacher": teacher.params} if decoder is None else {"teacher": teacher.params, "vae": decoder.params}

    def init(rng):
        flow_rng, proj_rng = jax.random.split(rng)
        flow = model.init(flow_rng, *registry.flow_example_inputs(config.model))
        dummy = jnp.zeros((1, 1, model.channels), jnp.float32)
        projectors = {location_name(loc): projector.init(jax.random.fold_in(proj_rng, n), dummy)["params"]
                      for n, loc in enumerate(locations)}
        return {"flow": flow, "projectors": projectors}

    def loss_fn(params, batch, rng, index, frozen):
        keys = jax.vmap(lambda k: jax.random.split(k, 2))(example_keys(rng, index))
        x, y = flow_inputs(config.train, model.num_classes, batch, keys, config.get("latent"))
        z, logdets, records = forward_pass(model, params["flow"], x, y)
        nll = likelihood.nll_loss(z, logdets)
        hiddens = alignment_hiddens(model, params["flow"], z, records, y, locations, mode, passes)
        images = batch["image"]
        if decoder is not None:  # latents: DINO sees the decoded posterior mean (the clean image)
            images = decoder.decode_uint8(frozen["vae"], latent_space.mean_latents(batch["image"], config.latent))
        target = teacher.apply(frozen["teacher"], images)
        align_loss = alignment_loss(projector, params["projectors"], hiddens, target, grid)
        loss = nll + weight * align_loss
        return loss, {"loss": loss, "nll": nll, "align": align_loss,
                      "logdet": jnp.mean(jnp.sum(logdets, -1)), "z_sq": jnp.mean(jnp.square(z))}

    return Objective(name="rrepa", init=init, loss=loss_fn, flow_params=lambda params: params["flow"],
                     frozen=frozen, same_run_keys=("model", "data.name", "align"))


"""R-REPA: align flow hidden states with frozen DINOv2 patch features (PAPERS.md section 2).

Loss = NLL + align.weight * mean over locations of -mean_p cos(v_p, proj(h)_p), where v
are DINOv2 patch tokens of the clean image and h the hidden state after layer l of flow
block t (1-indexed in forward order, as in the paper: blocks 7 & 8, layer 6 -> [(7, 6), (8, 6)]).

Where a feature sits. Inside a block (block order, i.e. after its flip), the hidden state
at position t is computed from x[<= t] and, after proj_out and the one-token shift,
gives the affine parameters of token t + 1. "Undoing the shift" therefore assigns the
hidden at position t - 1 to token t: the state that generates a token during sampling
is the one matched with that token's DINO patch. Token 0 (in block order) passes
through the block unchanged and has no such state; it gets the hidden at position 0
(edge padding), the only state that saw nothing but itself. The flip is then undone,
so features are in raster order like the DINO grid. When the token grid and the DINO
grid differ, the projected features are resized to the DINO grid (area mean when the
DINO grid divides the token grid, else linear interpolation, antialiased).

Gradient modes (PAPERS.md section 2):
- forward: features from the ordinary forward pass; gradients reach block t and every
  earlier block (through its input x^{t-1}).
- detach: block t runs again on stop_gradient(x^{t-1}); only block t and the projector learn.
- reverse: z = F(x) is detached and the inverse is run teacher-forced, in parallel,
  from the top block down to the lowest aligned block: r^B = sg(z) and
  r^{k-1} = b_k + exp(a_k) * r^k (block order of block k), numerically equal to the
  forward state x^{k-1} but carrying a graph to the later blocks' parameters. Block k's
  transformer sees a straight-through context: sg(x^{k-1}) in value, a reconstruction
  of x^{k-1} in gradient, so its features (and its (a_k, b_k)) depend on blocks >= k only.
  Two variants (`align.reverse_passes`):
    1 (default, one transformer pass per block): the context's gradient path is
      u = sg(exp(a_k^fwd)) * r^k, the reconstruction with block k's own affine held at
      its forward values (the forward pass already computed them), so block k's
      parameters reach its features directly but not through its own context.
    2 (the literal text): (a_k, b_k) come from a pass on the pure teacher-forced context
      sg(x^{k-1}); an aligned block runs a second pass on
      sg(x^{k-1}) + (r^{k-1} - sg(r^{k-1})) for its features. Costs one more block pass
      per aligned block.
  In both, blocks earlier in forward order get no gradient: nothing below block t runs.

DINOv2 is frozen: its parameters reach the jitted step as `Objective.frozen` arguments
(replicated), not as trainable params and not as constants baked into the executable.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from biflow_jax import latent_space, likelihood
from biflow_jax.config_checks import validate_flow_stage
from biflow_jax.errors import ConfigError, require
from biflow_jax.models import registry
from biflow_jax.models.dino import DINO_SIZES, DinoConfig, Dinov2, dinov2_config
from biflow_jax.models.dino_preprocess import preprocess_for_dino
from biflow_jax.models.tarflow import TARFlow, patchify
from biflow_jax.objectives import Objective
from biflow_jax.objectives.flow import flow_inputs
from biflow_jax.sharding import example_keys

Array = jax.Array
Location = tuple[int, int]  # (block, layer), both 1-indexed, block in forward order

GRADIENT_MODES = ("reverse", "forward", "detach")
# A 2-layer, 64-wide random encoder for tests and benchmarks (never loaded from a file).
TINY_ENCODER = "tiny"


def parse_locations(locations: Sequence[Sequence[int]]) -> tuple[Location, ...]:
    """Config locations (lists from JSON or tuples) -> sorted unique (block, layer) pairs."""
    return tuple(sorted({(int(b), int(l)) for b, l in locations}))


def location_name(location: Location) -> str:
    return f"block{location[0]}_layer{location[1]}"


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
        layers = tuple(m.get("block_layers", ()) or ()) or (m.layers_per_block,) * m.num_blocks
        if len(layers) != m.num_blocks:
            continue  # a malformed model.block_layers is named when the flow is built
        require(1 <= layer <= layers[block - 1],
                f"align.locations layer {layer} is outside 1..{layers[block - 1]}, the layers of block {block} "
                "(model.layers_per_block / model.block_layers; 1-indexed)")
    require(a.weight >= 0, f"align.weight={a.weight} must be >= 0")
    require(a.projector_hidden > 0, f"align.projector_hidden={a.projector_hidden} must be positive")
    require(a.encoder in DINO_SIZES + (TINY_ENCODER,),
            f"align.encoder={a.encoder!r} must be one of {DINO_SIZES + (TINY_ENCODER,)}")
    require(a.dtype in ("float32", "bfloat16"), f"align.dtype={a.dtype!r} must be 'float32' or 'bfloat16'")
    require(a.resolution >= 14, f"align.resolution={a.resolution} is smaller than one 14-pixel DINO patch")
    require(m.in_channels in (1, 3) or latent_space.enabled(config),
            f"alignment needs 1- or 3-channel images (or latents, latent.enabled), model.in_channels={m.in_channels}")
    require(not (a.encoder == TINY_ENCODER and not a.random_init),
            "align.encoder='tiny' exists only with align.random_init=True")


# ---------------------------------------------------------------------------
# The frozen teacher.

@dataclasses.dataclass(frozen=True)
class Teacher:
    """Frozen DINOv2: uint8 images -> (N, grid*grid, width) patch features, no gradient."""

    encoder: Dinov2
    params: Any
    resolution: int

    @property
    def grid(self) -> int:
        return self.resolution // self.encoder.config.patch_size

    @property
    def width(self) -> int:
        return self.encoder.config.hidden_size

    def apply(self, params: Any, images_uint8: Array) -> Array:
        """Features with the given encoder params (the train step passes them as frozen args)."""
        x = likelihood.to_unit_range(images_uint8)  # the clean image, as in the paper
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        x = preprocess_for_dino(x, self.resolution)
        out = self.encoder.apply({"params": params}, x)
        return jax.lax.stop_gradient(out.patch_tokens.astype(jnp.float32))

    def __call__(self, images_uint8: Array) -> Array:
        return self.apply(self.params, images_uint8)


@dataclasses.dataclass(frozen=True)
class ConstantTeacher:
    """The same (grid*grid, width) features for every image: alignment without encoder cost."""

    params: Array  # (grid*grid, width) features

    @property
    def grid(self) -> int:
        return int(round(self.params.shape[0] ** 0.5))

    @property
    def width(self) -> int:
        return int(self.params.shape[1])

    def apply(self, params: Array, images_uint8: Array) -> Array:
        return jnp.broadcast_to(params, (images_uint8.shape[0],) + params.shape)

    def __call__(self, images_uint8: Array) -> Array:
        return self.apply(self.params, images_uint8)


def tiny_encoder_config() -> DinoConfig:
    return DinoConfig(hidden_size=64, num_layers=2, num_heads=2, patch_size=14, image_size=56)


def missing_weights_message(align: ml_collections.ConfigDict) -> str:
    name = align.encoder if align.encoder in DINO_SIZES else "vitb14"
    hub = {"vits14": "small", "vitb14": "base", "vitl14": "large", "vitg14": "giant"}[name]
    reg = "_reg4" if align.registers else ""
    return (f"align.weights is empty: R-REPA needs frozen DINOv2 {name} weights. Set "
            f"--config.align.weights to a transformers checkpoint directory (config.json + model.safetensors "
            f"of facebook/dinov2{'-with-registers' if align.registers else ''}-{hub}) or to the torch-hub "
            f"file dinov2_{name}{reg}_pretrain.pth; this code never downloads. "
            "(align.random_init=True uses a random encoder, for tests only.)")


def make_teacher(align: ml_collections.ConfigDict, seed: int = 0) -> Teacher:
    """Load the encoder named by `align` (or a random one if align.random_init)."""
    from biflow_jax.interop import dino_weights

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[align.dtype]
    if align.weights:
        path = os.path.expanduser(align.weights)
        if os.path.isdir(path):
            cfg, params = dino_weights.load_dino(path)
        else:
            size = tiny_encoder_config() if align.encoder == TINY_ENCODER else align.encoder
            cfg, params = dino_weights.load_dino(path, size=size, registers=bool(align.registers))
    elif align.random_init:
        cfg = tiny_encoder_config() if align.encoder == TINY_ENCODER else dinov2_config(align.encoder,
                                                                                       align.registers)
        dummy = jnp.zeros((1, cfg.patch_size, cfg.patch_size, 3), jnp.float32)
        params = Dinov2(cfg).init(jax.random.key(seed), dummy)["params"]
    else:
        raise FileNotFoundError(missing_weights_message(align))
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return Teacher(Dinov2(cfg, dtype), params, int(align.resolution))


# ---------------------------------------------------------------------------
# Features: projector, token order, grid matching, loss.

class Projector(nn.Module):
    """Flow hidden (C) -> encoder width: Linear, SiLU, Linear, SiLU, Linear (REPA's MLP)."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, h: Array) -> Array:
        h = nn.silu(nn.Dense(self.hidden, name="fc1")(h.astype(jnp.float32)))
        h = nn.silu(nn.Dense(self.hidden, name="fc2")(h))
        return nn.Dense(self.out, name="fc3")(h)


def raster_features(hidden: Array, flip: bool) -> Array:
    """Block-order hiddens (N, T, C) -> per-token features in raster order.

    Token t (block order) gets the hidden at t - 1, the state that produced its affine
    parameters; token 0 gets the hidden at 0. Then the block's flip is undone.
    """
    shifted = jnp.concatenate([hidden[:, :1], hidden[:, :-1]], axis=1)
    return shifted[:, ::-1] if flip else shifted


def to_grid(features: Array, grid: int) -> Array:
    """(N, T, D) raster tokens of a square grid -> (N, grid*grid, D)."""
    n, t, d = features.shape
    side = int(round(t**0.5))
    if side * side != t:
        raise ValueError(f"{t} tokens do not form a square grid")
    if side == grid:
        return features
    x = features.reshape(n, side, side, d)
    if side % grid == 0:
        k = side // grid
        x = x.reshape(n, grid, k, grid, k, d).mean(axis=(2, 4))
    else:
        x = jax.image.resize(x, (n, grid, grid, d), method="linear", antialias=True)
    return x.reshape(n, grid * grid, d)


def negative_cosine(prediction: Array, target: Array) -> Array:
    """-mean over batch and patches of cos(prediction_p, target_p); eps guards zero vectors."""
    p = prediction.astype(jnp.float32)
    v = target.astype(jnp.float32)
    p = p * jax.lax.rsqrt(jnp.maximum(jnp.sum(p * p, -1, keepdims=True), 1e-12))
    v = v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, -1, keepdims=True), 1e-12))
    return -jnp.mean(jnp.sum(p * v, -1))


# ---------------------------------------------------------------------------
# Passes through the flow.

@dataclasses.dataclass(frozen=True)
class BlockRecord:
    """One block of the forward pass: its input (raster), affine (block order), hiddens."""

    inputs: Array
    a: Array
    b: Array
    hiddens: tuple[Array, ...]


def block_order(tokens: Array, index: int) -> Array:
    """Raster <-> block order of block `index` (odd blocks are flipped; a flip is its own inverse)."""
    return tokens[:, ::-1] if index % 2 else tokens


def forward_pass(model: TARFlow, flow_params: Any, x: Array, y: Array | None):
    """The forward flow block by block, keeping each block's (a, b).

    Returns (z raster tokens, logdets (N, B), records); equal to `model.apply(params, x, y)`.
    """
    tokens = patchify(x.astype(jnp.float32), model.patch_size)
    records, logdets = [], []
    for i in range(model.num_blocks):
        x_perm = block_order(tokens, i)
        a, b, hiddens = model.apply(flow_params, i, x_perm, y, method=TARFlow.block_transform)
        z_perm = (x_perm.astype(a.dtype) - b) * jnp.exp(-a)
        records.append(BlockRecord(tokens, a, b, hiddens))
        logdets.append(-a.mean(axis=(1, 2)))
        tokens = block_order(z_perm, i)
    return tokens, jnp.stack(logdets, axis=1), records


def _straight_through(value: Array, gradient: Array) -> Array:
    """Equal to `value`, differentiated as `gradient`."""
    return jax.lax.stop_gradient(value) + (gradient - jax.lax.stop_gradient(gradient))


def reverse_features(model: TARFlow, flow_params: Any, z: Array, records: Sequence[BlockRecord],
                     y: Array | None, blocks: Sequence[int], passes: int = 1) -> dict[int, tuple[Array, ...]]:
    """Hiddens (block order) of the 0-indexed `blocks` from the teacher-forced parallel inverse.

    See the module docstring; `records` are the forward pass's, whose states are used
    only as stop-gradient context.
    """
    sg = jax.lax.stop_gradient
    lowest = min(blocks)
    features: dict[int, tuple[Array, ...]] = {}
    r = sg(z)  # raster order
    for k in range(model.num_blocks - 1, lowest - 1, -1):
        rec = records[k]
        context = sg(block_order(rec.inputs, k)).astype(rec.a.dtype)
        r_perm = block_order(r, k)
        if passes == 1:
            u = sg(jnp.exp(rec.a)) * r_perm
            a, b, hiddens = model.apply(flow_params, k, _straight_through(context, u), y,
                                        method=TARFlow.block_transform)
            r_perm = b + jnp.exp(a) * r_perm
        else:
            a, b, hiddens = model.apply(flow_params, k, context, y, method=TARFlow.block_transform)
            r_perm = b + jnp.exp(a) * r_perm
            if k in blocks:
                _, _, hiddens = model.apply(flow_params, k, _straight_through(context, r_perm), y,
                                            method=TARFlow.block_transform)
        if k in blocks:
            features[k] = hiddens
        r = block_order(r_perm, k)
    return features


def detached_features(model: TARFlow, flow_params: Any, records: Sequence[BlockRecord], y: Array | None,
                      blocks: Sequence[int]) -> dict[int, tuple[Array, ...]]:
    """Hiddens of each block rerun on its stop-gradient input: only the block itself learns."""
    out = {}
    for k in blocks:
        context = jax.lax.stop_gradient(block_order(records[k].inputs, k))
        out[k] = model.apply(flow_params, k, context, y, method=TARFlow.block_transform)[2]
    return out


def alignment_hiddens(model: TARFlow, flow_params: Any, z: Array, records: Sequence[BlockRecord],
                      y: Array | None, locations: Sequence[Location], mode: str,
                      passes: int = 1) -> dict[Location, Array]:
    """{(block, layer) 1-indexed: raster-order features (N, T, C)} under a gradient mode."""
    blocks = sorted({b - 1 for b, _ in locations})
    if mode == "forward":
        per_block = {k: records[k].hiddens for k in blocks}
    elif mode == "detach":
        per_block = detached_features(model, flow_params, records, y, blocks)
    elif mode == "reverse":
        per_block = reverse_features(model, flow_params, z, records, y, blocks, passes)
    else:
        raise ConfigError(f"align.mode={mode!r} must be one of {GRADIENT_MODES}")
    return {(b, l): raster_features(per_block[b - 1][l - 1], bool((b - 1) % 2)) for b, l in locations}


def alignment_loss(projector: Projector, projector_params: dict, hiddens: dict[Location, Array],
                   target: Array, grid: int) -> Array:
    """Mean over locations of the negative patch cosine between projected features and `target`."""
    losses = []
    for location, h in sorted(hiddens.items()):
        projected = projector.apply({"params": projector_params[location_name(location)]}, h)
        losses.append(negative_cosine(to_grid(projected, grid), target))
    return jnp.mean(jnp.stack(losses))


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
    without the encoder.
    """
    validate_align(config)
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


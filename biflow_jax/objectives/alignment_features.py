"""R-REPA's feature passes (arXiv:2511.22345): which flow hidden state is matched with which DINO
patch, under which gradient mode, and the alignment loss.

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

Gradient modes (arXiv:2511.22345; docs/rrepa.md):
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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from biflow_jax.architecture import block_flipped
from biflow_jax.errors import ConfigError
from biflow_jax.models.repa_projector import Projector
from biflow_jax.models.tarflow import TARFlow, block_order

Array = jax.Array
Location = tuple[int, int]  # (block, layer), both 1-indexed, block in forward order
GRADIENT_MODES = ("reverse", "forward", "detach")


def location_name(location: Location) -> str:
    return f"block{location[0]}_layer{location[1]}"


def raster_features(hidden: Array, flip: bool) -> Array:
    """Block-order hiddens (N, T, C) -> per-token features in raster order.

    Token t (block order) gets the hidden at t - 1, the state that produced its affine
    parameters; token 0 gets the hidden at 0. Then the block's flip is undone.
    """
    shifted = jnp.concatenate([hidden[:, :1], hidden[:, :-1]], axis=1)
    return block_order(shifted, flip)


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


def forward_pass(model: TARFlow, flow_params: Any, x: Array, y: Array | None):
    """The flow's own forward pass, keeping each block's (a, b): (z raster tokens, logdets (N, B), records)."""
    out = model.apply(flow_params, x, y, with_affine=True)
    records = [BlockRecord(out.trajectory[k], a, b, out.hiddens[k]) for k, (a, b) in enumerate(out.affine)]
    return out.z, out.logdets, records


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
        context = sg(block_order(rec.inputs, block_flipped(k))).astype(rec.a.dtype)
        r_perm = block_order(r, block_flipped(k))
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
        r = block_order(r_perm, block_flipped(k))
    return features


def detached_features(model: TARFlow, flow_params: Any, records: Sequence[BlockRecord], y: Array | None,
                      blocks: Sequence[int]) -> dict[int, tuple[Array, ...]]:
    """Hiddens of each block rerun on its stop-gradient input: only the block itself learns."""
    out = {}
    for k in blocks:
        context = jax.lax.stop_gradient(block_order(records[k].inputs, block_flipped(k)))
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
    return {(b, l): raster_features(per_block[b - 1][l - 1], block_flipped(b - 1)) for b, l in locations}


def alignment_loss(projector: Projector, projector_params: dict, hiddens: dict[Location, Array],
                   target: Array, grid: int) -> Array:
    """Mean over locations of the negative patch cosine between projected features and `target`."""
    losses = []
    for location, h in sorted(hiddens.items()):
        projected = projector.apply({"params": projector_params[location_name(location)]}, h)
        losses.append(negative_cosine(to_grid(projected, grid), target))
    return jnp.mean(jnp.stack(losses))

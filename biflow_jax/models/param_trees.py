"""Param-tree bookkeeping: sizes, and the flow's two layer layouts.

The flow's checkpoints and exports keep one subtree per layer (`blocks_i/attn_blocks_{l}/...`);
`model.scan_layers` runs each block's layers under `nn.scan`, whose params are the same leaves
stacked on a leading layer axis (`blocks_i/attn_blocks/...`). Converting between the two keeps
old workdirs and exports readable whichever way a run computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


def count_params(params: Any) -> int:
    """The number of scalars in a (possibly abstract) param tree."""
    return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


def _layer_index(name: str) -> int | None:
    prefix = "attn_blocks_"
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def stack_layer_params(params: Any) -> Any:
    """Per-layer flow params (`blocks_i/attn_blocks_{l}/...`, the export and checkpoint layout) ->
    the `scan_layers` layout (`blocks_i/attn_blocks/...`, every leaf stacked on a new leading
    layer axis). Accepts the variables dict ({"params": ...}) or the bare params; keeps its form."""
    if "params" in params and isinstance(params["params"], Mapping):
        return {**params, "params": stack_layer_params(params["params"])}
    out = {}
    for name, block in params.items():
        layers = sorted((i, sub) for sub in block if (i := _layer_index(sub)) is not None)
        if not name.startswith("blocks_") or not layers:
            out[name] = block
            continue
        if [i for i, _ in layers] != list(range(len(layers))):
            raise ValueError(f"{name}: layers {[i for i, _ in layers]} are not 0..{len(layers) - 1}")
        rest = {k: v for k, v in block.items() if _layer_index(k) is None}
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[block[sub] for _, sub in layers])
        out[name] = {**rest, "attn_blocks": stacked}
    return out


def unstack_layer_params(params: Any) -> Any:
    """The inverse of `stack_layer_params`: `scan_layers` params -> the per-layer layout."""
    if "params" in params and isinstance(params["params"], Mapping):
        return {**params, "params": unstack_layer_params(params["params"])}
    out = {}
    for name, block in params.items():
        if not name.startswith("blocks_") or "attn_blocks" not in block:
            out[name] = block
            continue
        stacked = block["attn_blocks"]
        num_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        rest = {k: v for k, v in block.items() if k != "attn_blocks"}
        layers = {f"attn_blocks_{l}": jax.tree_util.tree_map(lambda x, l=l: x[l], stacked) for l in range(num_layers)}
        out[name] = {**rest, **layers}
    return out

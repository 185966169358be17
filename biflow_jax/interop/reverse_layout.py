"""The single mapping between our Flax reverse model G (`ReverseViT`) and its PyTorch port.

Export (`reverse_params_to_state_dict`) and import (`state_dict_to_reverse_params`) both
read `reverse_layout`, so the two directions cannot drift apart. Pure numpy on purpose:
exporting must work where torch is not installed. G's stage split and hidden width are
`biflow_jax.architecture`'s, shared with the model and the PyTorch port.

Names: Flax `blocks_{l}` / `heads_{k}` / `reembed_{k}` <-> torch `blocks.{l}` /
`heads.{k}` / `reembed.{k}`; RMSNorm `scale` and the label table's `embedding` <-> torch
`weight`; a torch Linear weight (out, in) is the transpose of a Flax Dense kernel (in, out).
G has no buffers worth storing: its positions and rotary angles are fixed functions of
the config, rebuilt by the port.

`cfg` below is the exported `reverse_config.json` dict (see `biflow_jax.export`): G's
constructor arguments num_tokens, token_dim, num_forward_blocks, depth, width, heads,
mlp_ratio, layers_per_stage, num_classes, guidance_conditioning, guidance_embed_dim,
stage_bottleneck.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from biflow_jax.architecture import stage_sizes, swiglu_hidden
from biflow_jax.interop.tarflow_layout import FlaxPath, TensorSpec, params_to_state_dict, state_dict_to_params


def config_stage_sizes(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    """G's resolved stage split for an exported `reverse_config.json` dict."""
    return stage_sizes(int(cfg["depth"]), int(cfg["num_forward_blocks"]), cfg.get("layers_per_stage"))


def reverse_layout(cfg: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Every key of the PyTorch `ReverseModel` for this config, with its torch shape and Flax origin."""
    width, token_dim = int(cfg["width"]), int(cfg["token_dim"])
    head_dim = width // int(cfg["heads"])
    hidden = swiglu_hidden(width, float(cfg.get("mlp_ratio", 4.0)))
    sizes = config_stage_sizes(cfg)

    layout: dict[str, TensorSpec] = {}

    def linear(torch_name: str, flax_path: FlaxPath, fan_in: int, fan_out: int) -> None:
        layout[f"{torch_name}.weight"] = TensorSpec(flax_path + ("kernel",), (fan_out, fan_in), transpose=True)
        layout[f"{torch_name}.bias"] = TensorSpec(flax_path + ("bias",), (fan_out,))

    linear("embed", ("embed",), token_dim, width)
    layout["class_embed.weight"] = TensorSpec(("class_embed", "embedding"), (int(cfg["num_classes"]) + 1, width))
    if cfg.get("guidance_conditioning", True):
        linear("guidance_mlp_in", ("guidance_mlp_in",), int(cfg.get("guidance_embed_dim", 256)), width)
        linear("guidance_mlp_out", ("guidance_mlp_out",), width, width)
    for l in range(sum(sizes)):
        block = (f"blocks_{l}",)
        linear(f"blocks.{l}.adaln", block + ("adaln",), width, 6 * width)
        linear(f"blocks.{l}.attention.qkv", block + ("attention", "qkv"), width, 3 * width)
        for norm in ("q_norm", "k_norm"):
            layout[f"blocks.{l}.attention.{norm}.weight"] = TensorSpec(block + ("attention", norm, "scale"),
                                                                      (head_dim,))
        linear(f"blocks.{l}.attention.proj", block + ("attention", "proj"), width, width)
        linear(f"blocks.{l}.mlp.gate_up", block + ("mlp", "gate_up"), width, 2 * hidden)
        linear(f"blocks.{l}.mlp.down", block + ("mlp", "down"), hidden, width)
    for k in range(len(sizes)):
        head = (f"heads_{k}",)
        if k == len(sizes) - 1:  # only the image head is adaLN-modulated
            linear(f"heads.{k}.adaln", head + ("adaln",), width, 2 * width)
        else:
            layout[f"heads.{k}.norm.weight"] = TensorSpec(head + ("norm", "scale"), (width,))
        linear(f"heads.{k}.proj", head + ("proj",), width, token_dim)
    if cfg.get("stage_bottleneck", False):
        for k in range(len(sizes) - 1):
            linear(f"reembed.{k}", (f"reembed_{k}",), token_dim, width)
    return layout


def reverse_params_to_state_dict(params: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax G params (bare tree or `{'params': tree}`) -> PyTorch state_dict of contiguous float32 arrays."""
    return params_to_state_dict(params, reverse_layout(cfg), "reverse")


def state_dict_to_reverse_params(state_dict: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """PyTorch state_dict -> `{'params': tree}` of float32 numpy arrays for `ReverseViT` (strict)."""
    return state_dict_to_params(state_dict, reverse_layout(cfg))

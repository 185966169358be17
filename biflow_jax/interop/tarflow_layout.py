"""The single mapping between our Flax TARFlow params and apple/ml-tarflow's state_dict.

Export and import both go through `state_dict_layout`, so the two directions cannot drift
apart. Pure numpy on purpose: exporting must work where torch is not installed.

The layout follows ml-tarflow's `transformer_flow.Model`: `blocks.{i}` <-> `blocks_{i}`,
`attn_blocks.{l}` <-> `attn_blocks_{l}`, `main.0`/`main.2` <-> `main_0`/`main_2`,
LayerNorm `weight` <-> Flax `scale`, and a torch Linear weight (out, in) is the transpose
of a Flax Dense kernel (in, out). Two buffers have no Flax counterpart: each block's causal
`attn_mask` (lower-triangular ones) and the model's prior variance `var` (ones).

The improved-flow options of `config.model` (`biflow_jax.architecture`: RoPE, RMSNorm,
QK-norm, SwiGLU or STARFlow's gated MLP, per-block layer counts, the clip of the shift; STARFlow
arXiv:2506.06276) change the layout or the maths; ml-tarflow has none of them, so only
`biflow_jax.torch.tarflow.Model` reads such a state_dict
(`ml_tarflow_compatible` tells which is which).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from biflow_jax import architecture

FlaxPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One state_dict entry: its place in the Flax tree (None for a buffer) and its torch shape."""

    flax_path: FlaxPath | None
    shape: tuple[int, ...]
    transpose: bool = False  # a Dense kernel, stored transposed in torch


def ml_tarflow_lacks(model_cfg: Any) -> list[str]:
    """The options this flow uses that ml-tarflow's `transformer_flow.Model` lacks, by name
    (rope, rmsnorm, qk_norm, swiglu, geglu_starflow, block_layers=[...], clip_shift); empty for the
    default architecture. clip_shift changes no key but the maths, so ml-tarflow would run it wrongly."""
    return architecture.options_in_use(model_cfg)


def ml_tarflow_compatible(model_cfg: Any) -> bool:
    """Whether the exported state_dict has ml-tarflow's layout: every improved-flow option off.

    (head_dim, expansion and clip are our constructor extras and do not change the names;
    they are recorded in forward_config.json.)
    """
    return not ml_tarflow_lacks(model_cfg)


def state_dict_layout(model_cfg: Any) -> dict[str, TensorSpec]:
    """Every key the PyTorch Model has for this config, with its shape and Flax origin: exactly
    ml-tarflow's keys when `ml_tarflow_compatible(model_cfg)`.

    `model_cfg` is the `config.model` section (a ConfigDict or a plain dict).
    """
    options = architecture.flow_options(model_cfg)
    patch = model_cfg["patch_size"]
    tokens = (model_cfg["img_size"] // patch) ** 2
    token_dim = model_cfg["in_channels"] * patch * patch
    width = model_cfg["channels"]
    head_dim = model_cfg["head_dim"]
    hidden = architecture.mlp_hidden(options["mlp"], width, model_cfg["expansion"])
    classes = model_cfg["num_classes"]

    layout: dict[str, TensorSpec] = {}

    def add_linear(torch_name: str, flax_path: FlaxPath, fan_in: int, fan_out: int) -> None:
        layout[f"{torch_name}.weight"] = TensorSpec(flax_path + ("kernel",), (fan_out, fan_in), transpose=True)
        layout[f"{torch_name}.bias"] = TensorSpec(flax_path + ("bias",), (fan_out,))

    def add_norm(torch_name: str, flax_path: FlaxPath, dim: int = width) -> None:
        layout[f"{torch_name}.weight"] = TensorSpec(flax_path + ("scale",), (dim,))
        if options["norm"] == "layernorm":  # RMSNorm has no bias
            layout[f"{torch_name}.bias"] = TensorSpec(flax_path + ("bias",), (dim,))

    for i, num_layers in enumerate(architecture.flow_layer_counts(model_cfg)):
        torch_block, flax_block = f"blocks.{i}", (f"blocks_{i}",)
        add_linear(f"{torch_block}.proj_in", flax_block + ("proj_in",), token_dim, width)
        if not options["rope"]:  # RoPE replaces the learned position embedding
            layout[f"{torch_block}.pos_embed"] = TensorSpec(flax_block + ("pos_embed",), (tokens, width))
        if classes:
            layout[f"{torch_block}.class_embed"] = TensorSpec(flax_block + ("class_embed",), (classes, 1, width))
        for l in range(num_layers):
            torch_layer, flax_layer = f"{torch_block}.attn_blocks.{l}", flax_block + (f"attn_blocks_{l}",)
            add_norm(f"{torch_layer}.attention.norm", flax_layer + ("attention", "norm"))
            add_linear(f"{torch_layer}.attention.qkv", flax_layer + ("attention", "qkv"), width, 3 * width)
            add_linear(f"{torch_layer}.attention.proj", flax_layer + ("attention", "proj"), width, width)
            if options["qk_norm"]:
                add_norm(f"{torch_layer}.attention.q_norm", flax_layer + ("attention", "q_norm"), head_dim)
                add_norm(f"{torch_layer}.attention.k_norm", flax_layer + ("attention", "k_norm"), head_dim)
            add_norm(f"{torch_layer}.mlp.norm", flax_layer + ("mlp", "norm"))
            if options["mlp"] == "swiglu":
                add_linear(f"{torch_layer}.mlp.gate_up", flax_layer + ("mlp", "gate_up"), width, 2 * hidden)
                add_linear(f"{torch_layer}.mlp.down", flax_layer + ("mlp", "down"), hidden, width)
            elif options["mlp"] == "geglu_starflow":  # STARFlow's names: gate_proj, up_proj, down_proj
                for name, fan_in, fan_out in (("gate_proj", width, hidden), ("up_proj", width, hidden),
                                              ("down_proj", hidden, width)):
                    add_linear(f"{torch_layer}.mlp.{name}", flax_layer + ("mlp", name), fan_in, fan_out)
            else:
                add_linear(f"{torch_layer}.mlp.main.0", flax_layer + ("mlp", "main_0"), width, hidden)
                add_linear(f"{torch_layer}.mlp.main.2", flax_layer + ("mlp", "main_2"), hidden, width)
        add_linear(f"{torch_block}.proj_out", flax_block + ("proj_out",), width, 2 * token_dim)
        layout[f"{torch_block}.attn_mask"] = TensorSpec(None, (tokens, tokens))
    layout["var"] = TensorSpec(None, (tokens, token_dim))
    return layout


def causal_mask(num_tokens: int) -> np.ndarray:
    """The `attn_mask` buffer: 1 where a token may attend (itself and earlier tokens)."""
    return np.tril(np.ones((num_tokens, num_tokens), np.float32))


def _buffer_value(name: str, spec: TensorSpec) -> np.ndarray:
    if name.endswith("attn_mask"):
        return causal_mask(spec.shape[0])
    return np.ones(spec.shape, np.float32)  # `var`: our flows use a unit Gaussian prior


def _flatten(tree: Mapping[str, Any], prefix: FlaxPath = ()) -> dict[FlaxPath, Any]:
    flat: dict[FlaxPath, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unwrap_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept both `{'params': tree}` (what `model.init` returns) and the bare tree."""
    if set(params.keys()) == {"params"}:
        return params["params"]
    return params


def _describe(missing: list[str], extra: list[str], what: str, limit: int = 12) -> str:
    """'missing <what>: a, b; unexpected <what>: c' (long lists shortened)."""
    def listed(names: list[str]) -> str:
        more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more

    parts = [f"missing {what}: {listed(missing)}"] if missing else []
    parts += [f"unexpected {what}: {listed(extra)}"] if extra else []
    return "; ".join(parts)


def params_to_state_dict(params: Mapping[str, Any], layout: Mapping[str, TensorSpec], what: str,
                         buffer_value=None) -> dict[str, np.ndarray]:
    """Flax params (bare tree or `{'params': tree}`) -> state_dict of contiguous float32 arrays
    following `layout`; keys without a Flax path are buffers, filled by `buffer_value(name, spec)`.

    bfloat16 leaves are widened to float32 (exactly). Raises ValueError naming every missing
    or unexpected Flax leaf, or the first wrongly shaped one.
    """
    leaves = _flatten(_unwrap_params(params))
    wanted = {spec.flax_path for spec in layout.values() if spec.flax_path is not None}
    missing = sorted("/".join(p) for p in wanted - leaves.keys())
    extra = sorted("/".join(p) for p in leaves.keys() - wanted)
    if missing or extra:
        raise ValueError(f"{what} params do not match the config: {_describe(missing, extra, 'params')}")
    state_dict = {}
    for name, spec in layout.items():
        if spec.flax_path is None:
            state_dict[name] = buffer_value(name, spec)
            continue
        value = np.asarray(leaves[spec.flax_path]).astype(np.float32)
        if spec.transpose:
            value = value.T
        if value.shape != spec.shape:
            raise ValueError(f"{'/'.join(spec.flax_path)} -> {name}: expected torch shape {spec.shape}, "
                             f"got {value.shape}")
        state_dict[name] = np.ascontiguousarray(value)
    return state_dict


def state_dict_to_params(state_dict: Mapping[str, Any], layout: Mapping[str, TensorSpec],
                         check_buffer=None) -> dict[str, Any]:
    """state_dict -> `{'params': tree}` of float32 numpy arrays, strict like torch's
    `load_state_dict(strict=True)`: a missing, unexpected or wrongly shaped key raises
    ValueError naming it. Buffers (no Flax path) go to `check_buffer(name, value)`."""
    missing = [name for name in layout if name not in state_dict]
    extra = [name for name in state_dict if name not in layout]
    if missing or extra:
        raise ValueError(f"state_dict does not match the config: {_describe(missing, extra, 'keys')}")
    arrays = {name: np.asarray(state_dict[name]) for name in layout}
    wrong = [f"{name}: expected shape {spec.shape}, got {arrays[name].shape}"
             for name, spec in layout.items() if arrays[name].shape != spec.shape]
    if wrong:
        raise ValueError("state_dict has wrongly shaped keys: " + "; ".join(wrong))
    params: dict[str, Any] = {}
    for name, spec in layout.items():
        value = arrays[name].astype(np.float32)
        if spec.flax_path is None:
            if check_buffer is not None:
                check_buffer(name, value)
            continue
        node = params
        for key in spec.flax_path[:-1]:
            node = node.setdefault(key, {})
        node[spec.flax_path[-1]] = np.ascontiguousarray(value.T if spec.transpose else value)
    return {"params": params}


def flow_params_to_state_dict(params: Mapping[str, Any], model_cfg: Any) -> dict[str, np.ndarray]:
    """Flax flow params -> ml-tarflow state_dict (buffers `attn_mask` and `var` included).

    `model.scan_layers` params (layers stacked under `attn_blocks`) are unstacked first."""
    from biflow_jax.models.param_trees import unstack_layer_params  # lazy: this module stays numpy-only

    return params_to_state_dict(unstack_layer_params(params), state_dict_layout(model_cfg), "flow", _buffer_value)


def _check_flow_buffer(name: str, value: np.ndarray) -> None:
    if name.endswith("attn_mask") and not np.array_equal(value, causal_mask(value.shape[0])):
        raise ValueError(f"{name} is not the lower-triangular causal mask the flow assumes")


def state_dict_to_flow_params(state_dict: Mapping[str, Any], model_cfg: Any) -> dict[str, Any]:
    """ml-tarflow state_dict -> `{'params': tree}` of float32 numpy arrays for our TARFlow.

    Strict: a missing, unexpected or wrongly shaped key raises ValueError naming it, and so
    does an `attn_mask` that is not causal (it would be a different model). `var` is
    shape-checked only: it is a sampling-time prior scale, not part of the flow, so whoever
    imports decides what to do with it.
    """
    params = state_dict_to_params(state_dict, state_dict_layout(model_cfg), _check_flow_buffer)
    if model_cfg.get("scan_layers", False):  # the nn.scan layout: layers stacked on a leading axis
        from biflow_jax.models.param_trees import stack_layer_params

        params = jax_tree_to_numpy(stack_layer_params(params))
    return params


def jax_tree_to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: jax_tree_to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)

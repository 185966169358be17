"""Offline loading of DINOv2 weights into the ``biflow_jax.models.dino`` params tree.

Two on-disk formats are understood, both from local paths only:

* a transformers checkpoint directory (``save_pretrained`` of facebook/dinov2-*):
  ``config.json`` plus ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``, or a legacy ``pytorch_model.bin``). Both the
  hub key names (``attention.attention.query``, ``mlp.weights_in``) and the
  transformers>=5 in-memory names (``attention.q_proj``, ``mlp.gate_proj``) load.
* a facebookresearch/dinov2 torch-hub ``state_dict`` file (``.pth``), whose
  architecture comes from a size name / ``DinoConfig`` plus a registers flag.

Checking is strict: every missing, unexpected or wrongly shaped key raises a
ValueError naming it, because a silently half-loaded feature extractor would only
show up later as bad metrics.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from biflow_jax.interop.state_dicts import check_keys, parse_config, read_config_json, read_torch_file, read_weights_dir
from biflow_jax.models.dino import DinoConfig, dinov2_config

Params = dict[str, Any]
StateDict = Mapping[str, np.ndarray]

_HUB_SIZE_BY_WIDTH = {384: "vits14", 768: "vitb14", 1024: "vitl14", 1536: "vitg14"}


# ----------------------------------------------------------------------------------
# Entry point.


def load_dino(
    path: str | os.PathLike[str],
    size: str | DinoConfig | None = None,
    registers: bool | None = None,
) -> tuple[DinoConfig, Params]:
    """Load DINOv2 weights from a transformers directory or a torch-hub ``.pth`` file.

    Returns ``(config, params)`` where ``params`` is the tree to pass as
    ``Dinov2(config).apply({"params": params}, images)``. ``size``/``registers`` are
    only used for hub files (a directory's ``config.json`` defines its architecture).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DINOv2 weights not found: {path} does not exist")
    if path.is_dir():
        if size is not None or registers is not None:
            raise ValueError(
                f"{path} is a transformers checkpoint directory; its config.json defines the "
                "architecture, so size/registers must not be given"
            )
        return load_transformers_dino(path)
    return load_hub_dino(path, size=size, registers=registers)


# ----------------------------------------------------------------------------------
# Strict key/shape checking and the shared conversion.

# Each rule: flax path -> (source keys, function from source arrays to the flax array).
_Rule = tuple[tuple[str, ...], Callable[..., np.ndarray]]


def _linear(w: np.ndarray, *_: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _apply_rules(state: StateDict, rules: Mapping[str, _Rule]) -> Params:
    params: Params = {}
    for flax_path, (keys, fn) in rules.items():
        value = np.asarray(fn(*(np.asarray(state[k]) for k in keys)), dtype=np.float32)
        node = params
        *parents, leaf = flax_path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return params


def _common_shapes(cfg: DinoConfig) -> dict[str, tuple[int, ...]]:
    """Shapes in torch layout, keyed by hub-style names (renamed per format)."""
    d, p, c, f = cfg.hidden_size, cfg.patch_size, cfg.num_channels, cfg.mlp_hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, cfg.grid_size**2 + 1, d),
        "patch_embed.weight": (d, c, p, p),
        "patch_embed.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    if cfg.num_register_tokens:
        shapes["register_tokens"] = (1, cfg.num_register_tokens, d)
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        for name in ("norm1", "norm2"):
            shapes[b + name + ".weight"] = (d,)
            shapes[b + name + ".bias"] = (d,)
        shapes[b + "proj.weight"] = (d, d)
        shapes[b + "proj.bias"] = (d,)
        shapes[b + "ls1"] = (d,)
        shapes[b + "ls2"] = (d,)
        if cfg.use_swiglu_ffn:
            shapes[b + "ffn_out.weight"] = (d, f)
        else:
            shapes[b + "fc1.weight"] = (f, d)
            shapes[b + "fc1.bias"] = (f,)
            shapes[b + "ffn_out.weight"] = (d, f)
        shapes[b + "ffn_out.bias"] = (d,)
    return shapes


def _flax_rules(cfg: DinoConfig, name: Callable[[str], str]) -> dict[str, _Rule]:
    """Rules for everything except attention qkv and SwiGLU w12 (format specific)."""
    rules: dict[str, _Rule] = {
        "cls_token": ((name("cls_token"),), _same),
        "pos_embed": ((name("pos_embed"),), _same),
        "patch_embed/kernel": (
            (name("patch_embed.weight"),),
            lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
        ),
        "patch_embed/bias": ((name("patch_embed.bias"),), _same),
        "norm/scale": ((name("norm.weight"),), _same),
        "norm/bias": ((name("norm.bias"),), _same),
    }
    if cfg.num_register_tokens:
        rules["register_tokens"] = ((name("register_tokens"),), _same)
    for i in range(cfg.num_layers):
        b, f = f"blocks.{i}.", f"blocks_{i}/"
        for n in ("norm1", "norm2"):
            rules[f + n + "/scale"] = ((name(b + n + ".weight"),), _same)
            rules[f + n + "/bias"] = ((name(b + n + ".bias"),), _same)
        rules[f + "attn/proj/kernel"] = ((name(b + "proj.weight"),), _linear)
        rules[f + "attn/proj/bias"] = ((name(b + "proj.bias"),), _same)
        rules[f + "ls1/gamma"] = ((name(b + "ls1"),), _same)
        rules[f + "ls2/gamma"] = ((name(b + "ls2"),), _same)
        out = "w3" if cfg.use_swiglu_ffn else "fc2"
        rules[f + f"mlp/{out}/kernel"] = ((name(b + "ffn_out.weight"),), _linear)
        rules[f + f"mlp/{out}/bias"] = ((name(b + "ffn_out.bias"),), _same)
        if not cfg.use_swiglu_ffn:
            rules[f + "mlp/fc1/kernel"] = ((name(b + "fc1.weight"),), _linear)
            rules[f + "mlp/fc1/bias"] = ((name(b + "fc1.bias"),), _same)
    return rules


def _concat_rows(*ws: np.ndarray) -> np.ndarray:
    return np.concatenate(ws, axis=0)


def _concat_linear(*ws: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(ws, axis=0).T)


# ----------------------------------------------------------------------------------
# (a) transformers checkpoint directory.

_TRANSFORMERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "dinov2": dict(patch_size=14, use_mask_token=True),
    "dinov2_with_registers": dict(patch_size=16, num_register_tokens=4),
}
_TRANSFORMERS_COMMON_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    mlp_ratio=4,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    image_size=224,
    num_channels=3,
    qkv_bias=True,
    layerscale_value=1.0,
    use_swiglu_ffn=False,
)


def _square(value: Any, field: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"config.json {field}={value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


def config_from_transformers(raw: Mapping[str, Any]) -> tuple[DinoConfig, bool]:
    """DinoConfig from a transformers ``config.json`` dict, plus whether a mask token is stored.

    Missing fields take the transformers defaults of the given ``model_type``.
    """
    model_type = raw.get("model_type")
    if model_type not in _TRANSFORMERS_DEFAULTS:
        raise ValueError(
            f"config.json model_type={model_type!r}; "
            f"expected one of {sorted(_TRANSFORMERS_DEFAULTS)}"
        )
    merged = {**_TRANSFORMERS_COMMON_DEFAULTS, **_TRANSFORMERS_DEFAULTS[model_type], **raw}
    if merged["hidden_act"] != "gelu":
        raise ValueError(
            f"config.json hidden_act={merged['hidden_act']!r}; only exact 'gelu' is supported"
        )
    with_registers = model_type == "dinov2_with_registers"
    cfg = DinoConfig(
        hidden_size=int(merged["hidden_size"]),
        num_layers=int(merged["num_hidden_layers"]),
        num_heads=int(merged["num_attention_heads"]),
        patch_size=_square(merged["patch_size"], "patch_size"),
        image_size=_square(merged["image_size"], "image_size"),
        mlp_ratio=float(merged["mlp_ratio"]),
        num_register_tokens=int(merged.get("num_register_tokens", 0)) if with_registers else 0,
        use_swiglu_ffn=bool(merged["use_swiglu_ffn"]),
        layer_norm_eps=float(merged["layer_norm_eps"]),
        layerscale_value=float(merged["layerscale_value"]),
        qkv_bias=bool(merged["qkv_bias"]),
        num_channels=int(merged["num_channels"]),
        interpolate_antialias=with_registers,
    )
    has_mask_token = with_registers or bool(merged.get("use_mask_token", True))
    return cfg, has_mask_token


def params_from_transformers_state_dict(
    state: StateDict, cfg: DinoConfig, has_mask_token: bool = True, source: str = "state_dict"
) -> Params:
    """Convert a transformers Dinov2(WithRegisters)Model state_dict to Flax params.

    Accepts the hub checkpoint names and the transformers>=5 in-memory names (chosen
    by whether any ``attention.q_proj`` key is present); mixing them is an error.
    """
    new_style = any(".attention.q_proj." in k for k in state)
    d, f = cfg.hidden_size, cfg.mlp_hidden_size
    if new_style:
        attn = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
                "proj": "attention.o_proj"}
        ffn_out = "mlp.down_proj" if cfg.use_swiglu_ffn else "mlp.fc2"
    else:
        attn = {"q": "attention.attention.query", "k": "attention.attention.key",
                "v": "attention.attention.value", "proj": "attention.output.dense"}
        ffn_out = "mlp.weights_out" if cfg.use_swiglu_ffn else "mlp.fc2"

    renames = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "register_tokens": "embeddings.register_tokens",
        "patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }

    def name(hub: str) -> str:
        if hub in renames:
            return renames[hub]
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hub)
        assert m is not None, hub
        rest = m.group(2)
        rest = {
            "ls1": "layer_scale1.lambda1",
            "ls2": "layer_scale2.lambda1",
            "proj.weight": attn["proj"] + ".weight",
            "proj.bias": attn["proj"] + ".bias",
            "fc1.weight": "mlp.fc1.weight",
            "fc1.bias": "mlp.fc1.bias",
            "ffn_out.weight": ffn_out + ".weight",
            "ffn_out.bias": ffn_out + ".bias",
        }.get(rest, rest)
        return f"encoder.layer.{m.group(1)}.{rest}"

    expected = {name(k): s for k, s in _common_shapes(cfg).items()}
    if has_mask_token:
        expected["embeddings.mask_token"] = (1, d)
    rules = _flax_rules(cfg, name)
    for i in range(cfg.num_layers):
        layer, f_ = f"encoder.layer.{i}.", f"blocks_{i}/"
        qkv_w = tuple(f"{layer}{attn[x]}.weight" for x in "qkv")
        for key in qkv_w:
            expected[key] = (d, d)
        rules[f_ + "attn/qkv/kernel"] = (qkv_w, _concat_linear)
        if cfg.qkv_bias:
            qkv_b = tuple(f"{layer}{attn[x]}.bias" for x in "qkv")
            for key in qkv_b:
                expected[key] = (d,)
            rules[f_ + "attn/qkv/bias"] = (qkv_b, _concat_rows)
        if cfg.use_swiglu_ffn:
            if new_style:
                w = (layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight")
                b = (layer + "mlp.gate_proj.bias", layer + "mlp.up_proj.bias")
                expected.update({w[0]: (f, d), w[1]: (f, d), b[0]: (f,), b[1]: (f,)})
            else:
                w, b = (layer + "mlp.weights_in.weight",), (layer + "mlp.weights_in.bias",)
                expected.update({w[0]: (2 * f, d), b[0]: (2 * f,)})
            rules[f_ + "mlp/w12/kernel"] = (w, _concat_linear)
            rules[f_ + "mlp/w12/bias"] = (b, _concat_rows)
    check_keys(state, expected, f"{source} (DINOv2)")
    return _apply_rules(state, rules)


def load_transformers_dino(directory: str | os.PathLike[str]) -> tuple[DinoConfig, Params]:
    """Load a ``save_pretrained`` facebook/dinov2-* directory (architecture from config.json)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"DINOv2 checkpoint directory {directory} has no config.json")
    raw = read_config_json(directory, "DINOv2", "a transformers facebook/dinov2-* save_pretrained directory")
    cfg, has_mask_token = parse_config(raw, config_from_transformers, config_path)
    state = read_weights_dir(directory, "model", "DINOv2")
    return cfg, params_from_transformers_state_dict(state, cfg, has_mask_token, str(directory))


# ----------------------------------------------------------------------------------
# (b) facebookresearch/dinov2 torch-hub state_dict.


def hub_config(
    state: StateDict, size: str | DinoConfig | None = None, registers: bool | None = None
) -> DinoConfig:
    """Architecture of a hub state_dict: given by name/config, else inferred from widths.

    ``registers=None`` means "use register tokens iff the file has them".
    """
    if isinstance(size, DinoConfig):
        if registers is not None and registers != bool(size.num_register_tokens):
            raise ValueError(
                f"registers={registers} contradicts the given config "
                f"(num_register_tokens={size.num_register_tokens})"
            )
        return size
    if registers is None:
        registers = "register_tokens" in state
    if size is None:
        if "cls_token" not in state:
            raise ValueError(
                "state_dict has no cls_token, so the DINOv2 size cannot be inferred "
                "(missing keys: cls_token)"
            )
        width = int(np.shape(state["cls_token"])[-1])
        if width not in _HUB_SIZE_BY_WIDTH:
            raise ValueError(
                f"cannot infer the DINOv2 size from cls_token width {width}; pass size= "
                "(a name or a DinoConfig)"
            )
        size = _HUB_SIZE_BY_WIDTH[width]
    return dinov2_config(size, registers=registers)


def params_from_hub_state_dict(
    state: StateDict, cfg: DinoConfig, source: str = "state_dict"
) -> Params:
    """Convert a facebookresearch/dinov2 hub state_dict to Flax params (strict)."""
    d, f = cfg.hidden_size, cfg.mlp_hidden_size
    renames = {"patch_embed.weight": "patch_embed.proj.weight",
               "patch_embed.bias": "patch_embed.proj.bias"}

    def name(hub: str) -> str:
        if hub in renames:
            return renames[hub]
        m = re.fullmatch(r"(blocks\.\d+\.)(.+)", hub)
        if m is None:
            return hub
        out = "mlp.w3" if cfg.use_swiglu_ffn else "mlp.fc2"
        rest = {
            "ls1": "ls1.gamma",
            "ls2": "ls2.gamma",
            "proj.weight": "attn.proj.weight",
            "proj.bias": "attn.proj.bias",
            "fc1.weight": "mlp.fc1.weight",
            "fc1.bias": "mlp.fc1.bias",
            "ffn_out.weight": out + ".weight",
            "ffn_out.bias": out + ".bias",
        }.get(m.group(2), m.group(2))
        return m.group(1) + rest

    expected = {name(k): s for k, s in _common_shapes(cfg).items()}
    expected["mask_token"] = (1, d)
    rules = _flax_rules(cfg, name)
    for i in range(cfg.num_layers):
        b, f_ = f"blocks.{i}.", f"blocks_{i}/"
        expected[b + "attn.qkv.weight"] = (3 * d, d)
        rules[f_ + "attn/qkv/kernel"] = ((b + "attn.qkv.weight",), _linear)
        if cfg.qkv_bias:
            expected[b + "attn.qkv.bias"] = (3 * d,)
            rules[f_ + "attn/qkv/bias"] = ((b + "attn.qkv.bias",), _same)
        if cfg.use_swiglu_ffn:
            expected[b + "mlp.w12.weight"] = (2 * f, d)
            expected[b + "mlp.w12.bias"] = (2 * f,)
            rules[f_ + "mlp/w12/kernel"] = ((b + "mlp.w12.weight",), _linear)
            rules[f_ + "mlp/w12/bias"] = ((b + "mlp.w12.bias",), _same)
    check_keys(state, expected, f"{source} (DINOv2)")
    return _apply_rules(state, rules)


def load_hub_dino(
    path: str | os.PathLike[str],
    size: str | DinoConfig | None = None,
    registers: bool | None = None,
) -> tuple[DinoConfig, Params]:
    """Load a torch-hub ``dinov2_*_pretrain.pth`` state_dict.

    ``size`` is a name (``vits14`` ...) or a DinoConfig; None infers the name from the
    embedding width. As in transformers, register models use antialiased position
    interpolation (the config's ``interpolate_antialias``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DINOv2 hub weights file not found: {path}")
    state = read_torch_file(path)
    cfg = hub_config(state, size, registers)
    return cfg, params_from_hub_state_dict(state, cfg, str(path))

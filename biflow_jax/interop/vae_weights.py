"""diffusers ``AutoencoderKL`` checkpoints <-> ``biflow_jax.models.vae`` params trees.

The Flax module names follow diffusers' (``down_blocks_0`` for ``down_blocks.0``), so the
conversion is a rename plus layout changes: conv kernels OIHW <-> HWIO, linear weights
(out, in) <-> (in, out), GroupNorm ``weight`` <-> ``scale``. The expected torch key/shape
table is derived from our own abstract params (``jax.eval_shape``) through that rename, and
every checkpoint is checked against it before conversion: a silently half-loaded VAE would
only show up much later as blurry samples or bad FID.

Checkpoints written by diffusers < 0.15 name the mid-block attention ``query``, ``key``,
``value`` and ``proj_attn``; those load too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax.interop.state_dicts import (
    StateDict,
    check_keys,
    flatten,
    nest,
    parse_config,
    read_config_json,
    read_weights_dir,
)
from biflow_jax.models.vae import AutoencoderKL, VAEConfig

Params = dict[str, Any]

WHAT = "VAE"
NEEDED = ("a diffusers AutoencoderKL directory such as one saved from stabilityai/sd-vae-ft-ema "
          "(config.json + diffusion_pytorch_model.safetensors)")

# diffusers' AutoencoderKL constructor defaults, for fields a hand-written config.json may omit.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": (64,), "layers_per_block": 1,
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_ATTN_WEIGHT_RE = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


# ----------------------------------------------------------------------------------
# Config.


def config_from_diffusers(raw: Mapping[str, Any], dtype: str = "float32") -> VAEConfig:
    """A `VAEConfig` from a diffusers AutoencoderKL config.json dict; ValueError for other architectures."""
    cls = raw.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"config.json describes a {cls}, not an AutoencoderKL ({NEEDED})")
    if raw.get("act_fn", "silu") != "silu":
        raise ValueError(f"unsupported VAE act_fn {raw['act_fn']!r} (only 'silu')")
    get = {k: raw.get(k, v) for k, v in _DIFFUSERS_DEFAULTS.items()}
    levels = len(get["block_out_channels"])
    for field, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(raw.get(field, [kind] * levels))
        if types != [kind] * levels:
            raise ValueError(f"unsupported VAE {field} {types}: expected {levels} x {kind!r} "
                             f"(one per block_out_channels entry)")
    sample_size = get["sample_size"]
    return VAEConfig(
        in_channels=int(get["in_channels"]),
        out_channels=int(get["out_channels"]),
        block_out_channels=tuple(int(c) for c in get["block_out_channels"]),
        layers_per_block=int(get["layers_per_block"]),
        latent_channels=int(get["latent_channels"]),
        norm_num_groups=int(get["norm_num_groups"]),
        sample_size=tuple(sample_size) if isinstance(sample_size, (list, tuple)) else int(sample_size),
        scaling_factor=float(get["scaling_factor"]),
        shift_factor=float(get["shift_factor"] or 0.0),
        use_quant_conv=bool(get["use_quant_conv"]),
        use_post_quant_conv=bool(get["use_post_quant_conv"]),
        mid_block_add_attention=bool(get["mid_block_add_attention"]),
        dtype=dtype,
    )


# ----------------------------------------------------------------------------------
# Names and shapes.


def torch_key(flax_path: str) -> str:
    """'encoder/down_blocks_0/resnets_1/conv1/kernel' -> 'encoder.down_blocks.0.resnets.1.conv1.weight'."""
    *modules, leaf = flax_path.split("/")
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join([*modules, "bias" if leaf == "bias" else "weight"])


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # conv kernel HWIO -> OIHW
        return np.transpose(value, (3, 2, 0, 1))
    if value.ndim == 2:  # dense kernel (in, out) -> (out, in)
        return np.transpose(value)
    return value


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # OIHW -> HWIO
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
        return np.transpose(value)
    return value


def abstract_params(cfg: VAEConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Our flat params ('a/b/leaf' -> ShapeDtypeStruct) for `cfg`, without allocating or computing anything."""
    side = cfg.downsample_factor
    image = jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), jnp.float32)
    variables = jax.eval_shape(AutoencoderKL(cfg).init, jax.random.key(0), image)
    return flatten(variables["params"])


def expected_state_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """The torch state_dict key -> shape table that diffusers' AutoencoderKL has for `cfg`."""
    table = {}
    for path, leaf in abstract_params(cfg).items():
        shape = leaf.shape
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:
            shape = (shape[1], shape[0])
        table[torch_key(path)] = tuple(shape)
    return table


def _modernise(state: StateDict) -> dict[str, np.ndarray]:
    """Rename pre-0.15 diffusers attention keys and flatten their (C, C, 1, 1) weights, if any."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        m = _LEGACY_RE.match(key)
        new = f"{m.group(1)}.{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}" if m else key
        if new != key and new in state:  # both spellings present: leave it to check_keys to complain
            new = key
        if _ATTN_WEIGHT_RE.search(new) and np.ndim(value) == 4 and tuple(np.shape(value)[2:]) == (1, 1):
            value = np.asarray(value)[:, :, 0, 0]
        out[new] = value
    return out


# ----------------------------------------------------------------------------------
# Conversion.


def vae_params_from_state_dict(cfg: VAEConfig, state: StateDict, what: str = WHAT) -> Params:
    """A diffusers AutoencoderKL state_dict -> our float32 params tree, after a strict key/shape check."""
    state = _modernise(state)
    check_keys(state, expected_state_shapes(cfg), what)
    flat = {path: np.ascontiguousarray(_to_flax_layout(np.asarray(state[torch_key(path)], dtype=np.float32)))
            for path in abstract_params(cfg)}
    return nest(flat)


def vae_params_to_state_dict(cfg: VAEConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our params tree -> a diffusers AutoencoderKL state_dict (numpy float32), the inverse of the loader."""
    flat = flatten(params)
    expected = abstract_params(cfg)
    if set(flat) != set(expected):
        raise ValueError(f"params do not match {cfg}: missing {sorted(set(expected) - set(flat))}, "
                         f"unexpected {sorted(set(flat) - set(expected))}")
    return {torch_key(path): np.ascontiguousarray(_to_torch_layout(np.asarray(value, dtype=np.float32)))
            for path, value in flat.items()}


def load_vae(path: str | os.PathLike[str], dtype: str = "float32") -> tuple[VAEConfig, Params]:
    """Load a diffusers AutoencoderKL directory (config.json + safetensors / sharded index / .bin).

    Returns ``(cfg, params)`` for ``AutoencoderKL(cfg).apply({"params": params}, ...)``; ``dtype``
    is the compute dtype recorded in ``cfg`` (params are float32 numpy arrays).
    """
    raw = read_config_json(path, WHAT, NEEDED)
    cfg = parse_config(raw, lambda r: config_from_diffusers(r, dtype=dtype), os.path.join(path, "config.json"))
    try:
        state = read_weights_dir(path, "diffusion_pytorch_model", WHAT)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} ({NEEDED})") from None
    return cfg, vae_params_from_state_dict(cfg, state, what=f"VAE weights in {path}")


def save_vae(path: str | os.PathLike[str], cfg: VAEConfig, params: Mapping[str, Any]) -> None:
    """Write params as a diffusers AutoencoderKL directory (config.json + safetensors) that `load_vae`
    and diffusers' `AutoencoderKL.from_pretrained` read: random test VAEs without torch."""
    import json

    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    levels = len(cfg.block_out_channels)
    raw = {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": cfg.in_channels,
           "out_channels": cfg.out_channels, "block_out_channels": list(cfg.block_out_channels),
           "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
           "layers_per_block": cfg.layers_per_block, "latent_channels": cfg.latent_channels,
           "norm_num_groups": cfg.norm_num_groups,
           "sample_size": list(cfg.sample_size) if isinstance(cfg.sample_size, tuple) else cfg.sample_size,
           "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor or None,
           "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
           "mid_block_add_attention": cfg.mid_block_add_attention}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    save_file(vae_params_to_state_dict(cfg, params), os.path.join(path, "diffusion_pytorch_model.safetensors"))

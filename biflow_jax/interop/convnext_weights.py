"""transformers ConvNeXt-V2 checkpoints as ``models.convnext.ConvNeXtV2`` params trees.

Reads a local ``save_pretrained`` directory of ``ConvNextV2Model`` or
``ConvNextV2ForImageClassification`` (e.g. facebook/convnextv2-base-22k-224): config.json
plus model.safetensors (sharded or not) or pytorch_model.bin. The classification head is
dropped and the ``convnextv2.`` prefix stripped. Every missing, unexpected or wrongly
shaped key is an error naming it (arXiv:2301.00808 architecture; used by BiFlow,
arXiv:2512.10953, as a perceptual feature network).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from biflow_jax.interop.state_dicts import check_keys, nest, parse_config, read_config_json, read_weights_dir
from biflow_jax.models.convnext import ConvNeXtConfig

Params = dict[str, Any]

_WHAT = "ConvNeXt-V2"
_NEEDED = "a save_pretrained directory of facebook/convnextv2-base-22k-224: config.json + model.safetensors"
_PREFIX = "convnextv2."
_HEAD = "classifier."


def config_from_json(raw: Mapping[str, Any], source: str = "config.json") -> ConvNeXtConfig:
    """A ConvNeXtConfig from a transformers ConvNextV2Config dict (defaults as in transformers)."""
    model_type = raw.get("model_type", "convnextv2")
    if model_type != "convnextv2":
        raise ValueError(f"{source}: model_type {model_type!r} is not a ConvNeXt-V2 ('convnextv2')")
    if raw.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only exact 'gelu')")
    patch = raw.get("patch_size", 4)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"{source}: non-square patch_size {patch} is not supported")
        patch = patch[0]
    image = raw.get("image_size", 224)
    if isinstance(image, (list, tuple)):
        image = image[0]
    config = ConvNeXtConfig(num_channels=int(raw.get("num_channels", 3)), depths=tuple(raw["depths"]),
                            hidden_sizes=tuple(raw["hidden_sizes"]),
                            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)), image_size=int(image),
                            patch_size=int(patch))
    stages = raw.get("num_stages", len(config.depths))
    if stages != len(config.depths):
        raise ValueError(f"{source}: num_stages {stages} but {len(config.depths)} depths")
    return config


# Conversions from torch layout to Flax layout, by kind.
_CONVERT = {
    "conv": lambda w: np.transpose(w, (2, 3, 1, 0)),  # (O, I, kh, kw) -> (kh, kw, I, O); depthwise I = 1
    "dense": lambda w: np.transpose(w),  # (out, in) -> (in, out)
    "grn": lambda w: np.reshape(w, (-1,)),  # (1, 1, 1, C) -> (C,)
    "copy": lambda w: w,
}


def _entries(config: ConvNeXtConfig) -> Iterator[tuple[str, str, tuple[int, ...], str]]:
    """(transformers key, Flax path, transformers shape, conversion kind) for every tensor."""

    def norm(key: str, path: str, dim: int) -> Iterator[tuple[str, str, tuple[int, ...], str]]:
        yield f"{key}.weight", f"{path}/scale", (dim,), "copy"
        yield f"{key}.bias", f"{path}/bias", (dim,), "copy"

    def conv(key: str, path: str, out: int, inp: int, k: int) -> Iterator[tuple[str, str, tuple[int, ...], str]]:
        yield f"{key}.weight", f"{path}/kernel", (out, inp, k, k), "conv"
        yield f"{key}.bias", f"{path}/bias", (out,), "copy"

    def dense(key: str, path: str, out: int, inp: int) -> Iterator[tuple[str, str, tuple[int, ...], str]]:
        yield f"{key}.weight", f"{path}/kernel", (out, inp), "dense"
        yield f"{key}.bias", f"{path}/bias", (out,), "copy"

    first = config.hidden_sizes[0]
    yield from conv("embeddings.patch_embeddings", "patch_embeddings", first, config.num_channels, config.patch_size)
    yield from norm("embeddings.layernorm", "embeddings_layernorm", first)
    previous = first
    for i, (width, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
        stage, path = f"encoder.stages.{i}", f"stages_{i}"
        if i > 0:
            yield from norm(f"{stage}.downsampling_layer.0", f"{path}/downsample_norm", previous)
            yield from conv(f"{stage}.downsampling_layer.1", f"{path}/downsample_conv", width, previous, 2)
        for j in range(depth):
            key, sub = f"{stage}.layers.{j}", f"{path}/layers_{j}"
            yield from conv(f"{key}.dwconv", f"{sub}/dwconv", width, 1, 7)
            yield from norm(f"{key}.layernorm", f"{sub}/layernorm", width)
            yield from dense(f"{key}.pwconv1", f"{sub}/pwconv1", 4 * width, width)
            yield f"{key}.grn.weight", f"{sub}/grn/gamma", (1, 1, 1, 4 * width), "grn"
            yield f"{key}.grn.bias", f"{sub}/grn/beta", (1, 1, 1, 4 * width), "grn"
            yield from dense(f"{key}.pwconv2", f"{sub}/pwconv2", width, 4 * width)
        previous = width
    yield from norm("layernorm", "layernorm", config.hidden_sizes[-1])


def transformers_shapes(config: ConvNeXtConfig) -> dict[str, tuple[int, ...]]:
    """transformers ``ConvNextV2Model`` state_dict key -> shape for this architecture."""
    return {key: shape for key, _, shape, _ in _entries(config)}


def flax_shapes(config: ConvNeXtConfig) -> dict[str, tuple[int, ...]]:
    """Flax params path ('a/b/c') -> shape, as the converter produces them."""
    return {path: _CONVERT[kind](np.empty(shape, np.float32)).shape for _, path, shape, kind in _entries(config)}


def convert_state(state: Mapping[str, np.ndarray], config: ConvNeXtConfig, source: str = _WHAT) -> Params:
    """A transformers ConvNeXt-V2 state_dict (either class, with or without prefix) -> params tree."""
    trunk = {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v for k, v in state.items() if not k.startswith(_HEAD)}
    check_keys(trunk, transformers_shapes(config), source)
    flat = {path: np.asarray(_CONVERT[kind](np.asarray(trunk[key], np.float32)))
            for key, path, _, kind in _entries(config)}
    return nest(flat)


def load_convnext(path: str | os.PathLike[str]) -> tuple[ConvNeXtConfig, Params]:
    """``(config, params)`` from a transformers ConvNeXt-V2 save_pretrained directory.

    Use as ``ConvNeXtV2(config).apply({"params": params}, imagenet_normalize(x))``.
    """
    directory = Path(path)
    raw = read_config_json(directory, _WHAT, _NEEDED)
    config = parse_config(raw, lambda r: config_from_json(r, str(directory / "config.json")), directory / "config.json")
    try:
        state = read_weights_dir(directory, "model", _WHAT)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} ({_NEEDED})") from None
    return config, convert_state(state, config, f"{_WHAT} weights in {directory}")

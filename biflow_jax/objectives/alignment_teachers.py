"""R-REPA's frozen teachers (arXiv:2511.22345): DINOv2 patch features of the clean image, or a
constant stand-in that times the alignment without the encoder.

DINOv2 is frozen: its parameters reach the jitted step as `Objective.frozen` arguments
(replicated), not as trainable params and not as constants baked into the executable.
This code never downloads weights: a config names a local file or asks for a random encoder.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from biflow_jax import likelihood
from biflow_jax.models.dino import DINO_SIZES, DinoConfig, Dinov2, dinov2_config
from biflow_jax.models.dino_preprocess import preprocess_for_dino

Array = jax.Array
# A 2-layer, 64-wide random encoder for tests and benchmarks (never loaded from a file).
TINY_ENCODER = "tiny"
ENCODERS = DINO_SIZES + (TINY_ENCODER,)


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

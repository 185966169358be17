"""ConvNeXt V2 (Woo et al., arXiv:2301.00808) image features in Flax Linen.

BiFlow (arXiv:2512.10953) uses the pooled features of a pretrained ConvNeXt-V2 as one of
its perceptual losses. This module follows transformers' ``ConvNextV2Model`` so that a
converted checkpoint reproduces its ``pooler_output``: a 4x4 stride-4 patchify conv and a
channel LayerNorm; four stages, each stage after the first opening with LayerNorm and a
2x2 stride-2 conv; every block is 7x7 depthwise conv, LayerNorm, Dense to 4x width, exact
GELU, global response normalisation (GRN), Dense back, plus the residual. Drop path is an
identity at inference and is not modelled. The output is the final LayerNorm of the
global-average-pooled last stage.

Inputs are NHWC and must already be normalised the way the checkpoint was trained:
ImageNet mean/std on [0, 1] pixels (``imagenet_normalize`` maps [-1, 1] images there),
at the checkpoint's resolution (224 for facebook/convnextv2-base-22k-224; resizing is the
caller's job). Parameter names mirror the transformers keys; see
``biflow_jax.interop.convnext_weights``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Fixed in transformers' ConvNextV2 for every norm except the final one (config.layer_norm_eps).
_BLOCK_LN_EPS = 1e-6
_GRN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    """Architecture of a ConvNeXt-V2 (the fields of transformers' ``ConvNextV2Config`` that matter)."""

    num_channels: int = 3
    depths: tuple[int, ...] = (3, 3, 27, 3)
    hidden_sizes: tuple[int, ...] = (128, 256, 512, 1024)
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        if len(self.depths) != len(self.hidden_sizes) or not self.depths:
            raise ValueError(f"depths {self.depths} and hidden_sizes {self.hidden_sizes} must be equally long "
                             "(one entry per stage)")


_PRESETS: dict[str, ConvNeXtConfig] = {
    # facebook/convnextv2-base-22k-224 (and -1k-224): 87,692,800 parameters without the classifier.
    "base": ConvNeXtConfig(depths=(3, 3, 27, 3), hidden_sizes=(128, 256, 512, 1024)),
    # Small enough to build and run in unit tests.
    "tiny-test": ConvNeXtConfig(depths=(1, 1, 2, 1), hidden_sizes=(16, 32, 48, 64), image_size=32),
}


def convnext_config(name: str) -> ConvNeXtConfig:
    """A preset architecture: "base" (ConvNeXt-V2-Base) or "tiny-test"."""
    if name not in _PRESETS:
        raise ValueError(f"unknown ConvNeXt-V2 preset {name!r}; known: {', '.join(sorted(_PRESETS))}")
    return _PRESETS[name]


def imagenet_normalize(x: jax.Array) -> jax.Array:
    """[-1, 1] NHWC images -> ImageNet mean/std normalised input (what ConvNeXt checkpoints expect)."""
    x = (x + 1.0) * 0.5
    return (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it, rather than E[x^2] - E[x]^2.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def _norm_with_zero_slope_at_zero(squares: jax.Array) -> jax.Array:
    """sqrt(squares), with the gradient 0 where squares is 0, as torch.linalg.vector_norm defines it.

    A plain sqrt has an infinite slope there; times the zero slope of the GELU that made the
    all-zero channel, that is NaN (inf * 0), and one such channel (likely at a stage's 1x1 map,
    e.g. a 32-pixel perceptual crop) poisons the whole gradient.
    """
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


class GRN(nn.Module):
    """Global response normalisation (arXiv:2301.00808, Sec. 3): x + gamma * (x * N(x)) + beta.

    N(x) is each channel's spatial L2 norm divided by its mean over channels (+1e-6); it makes
    channels compete and is what distinguishes V2 blocks from V1 ones.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.zeros, (channels,), jnp.float32)
        beta = self.param("beta", nn.initializers.zeros, (channels,), jnp.float32)
        x32 = x.astype(jnp.float32)
        norm = _norm_with_zero_slope_at_zero(jnp.sum(jnp.square(x32), axis=(1, 2), keepdims=True))
        response = norm / (jnp.mean(norm, axis=-1, keepdims=True) + _GRN_EPS)
        return (gamma * (x32 * response) + beta + x32).astype(self.dtype)


class ConvNeXtBlock(nn.Module):
    """One ConvNeXt-V2 block: depthwise 7x7, LayerNorm, inverted-bottleneck MLP with GRN, residual."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = nn.Conv(dim, (7, 7), padding=3, feature_group_count=dim, dtype=self.dtype, name="dwconv")(x)
        h = _layer_norm(_BLOCK_LN_EPS, self.dtype, "layernorm")(h)
        h = nn.Dense(4 * dim, dtype=self.dtype, name="pwconv1")(h)
        h = nn.gelu(h, approximate=False)
        h = GRN(dtype=self.dtype, name="grn")(h)
        h = nn.Dense(dim, dtype=self.dtype, name="pwconv2")(h)
        return x + h


class ConvNeXtStage(nn.Module):
    """Optional LayerNorm + 2x2 stride-2 downsampling conv, then ``depth`` blocks."""

    width: int
    depth: int
    downsample: bool
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample:
            x = _layer_norm(_BLOCK_LN_EPS, self.dtype, "downsample_norm")(x)
            x = nn.Conv(self.width, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                        name="downsample_conv")(x)
        block = nn.remat(ConvNeXtBlock) if self.remat else ConvNeXtBlock
        for j in range(self.depth):
            x = block(dtype=self.dtype, name=f"layers_{j}")(x)
        return x


class ConvNeXtV2(nn.Module):
    """ConvNeXt-V2 trunk; ``__call__(x)`` -> pooled features (B, hidden_sizes[-1]).

    ``x``: NHWC, ImageNet-normalised (see ``imagenet_normalize``). With
    ``return_hidden=True`` returns ``(pooled, last_hidden_state)``, the latter NHWC.
    ``dtype`` is the compute dtype (params stay float32); pooling and the final LayerNorm
    run in float32.
    """

    config: ConvNeXtConfig
    dtype: Dtype = jnp.float32
    remat: bool = False  # recompute each block's 4x-wide internals in the backward pass (same params)

    @nn.compact
    def __call__(self, x: jax.Array, return_hidden: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        cfg = self.config
        if x.shape[-1] != cfg.num_channels:
            raise ValueError(f"expected NHWC input with {cfg.num_channels} channels, got shape {x.shape}")
        p = cfg.patch_size
        x = nn.Conv(cfg.hidden_sizes[0], (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="patch_embeddings")(x.astype(self.dtype))
        x = _layer_norm(_BLOCK_LN_EPS, self.dtype, "embeddings_layernorm")(x)
        for i, (width, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths)):
            x = ConvNeXtStage(width, depth, downsample=i > 0, dtype=self.dtype, remat=self.remat,
                              name=f"stages_{i}")(x)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        pooled = nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name="layernorm")(pooled)
        return (pooled, x) if return_hidden else pooled

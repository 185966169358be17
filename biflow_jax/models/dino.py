"""DINOv2 ViT (optionally with register tokens) in Flax Linen.

The module mirrors the transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``
forward pass closely enough that converted checkpoints reproduce their outputs to
float32 round-off. That includes the position-embedding interpolation:
transformers resizes the learned patch-position grid with
``torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
size=(H // p, W // p))``, with ``antialias=True`` in the registers variant only.
(The original facebookresearch hub code uses a ``scale_factor`` with a 0.1 offset
instead; we follow transformers.) The resize is a fixed linear map for static
shapes, so it is built here as two small weight matrices in numpy, computed the
way torch computes them, and applied with an einsum.

Parameter names follow the torch-hub layout (``blocks_{i}/attn/qkv``, ``ls1``,
``mlp/fc1`` ...) so that weight conversion is a flat rename; see
``biflow_jax.interop.dino_weights``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


@dataclasses.dataclass(frozen=True)
class DinoConfig:
    """Hyper-parameters of a DINOv2 ViT.

    ``image_size // patch_size`` is the side of the learned (square) position grid;
    ``interpolate_antialias`` selects the transformers registers-variant resize.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    patch_size: int = 14
    image_size: int = 518
    mlp_ratio: float = 4.0
    num_register_tokens: int = 0
    use_swiglu_ffn: bool = False
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    qkv_bias: bool = True
    num_channels: int = 3
    interpolate_antialias: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} < patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        """Side of the learned position-embedding grid."""
        return self.image_size // self.patch_size

    @property
    def mlp_hidden_size(self) -> int:
        """Hidden width of the FFN, including the SwiGLU 2/3 rounding of transformers/hub."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden


# Public DINOv2 sizes (facebookresearch/dinov2 and facebook/dinov2-* on the hub).
_SIZES: dict[str, dict[str, Any]] = {
    "vits14": dict(hidden_size=384, num_layers=12, num_heads=6),
    "vitb14": dict(hidden_size=768, num_layers=12, num_heads=12),
    "vitl14": dict(hidden_size=1024, num_layers=24, num_heads=16),
    "vitg14": dict(hidden_size=1536, num_layers=40, num_heads=24, use_swiglu_ffn=True),
}
DINO_SIZES: tuple[str, ...] = tuple(_SIZES)


def dinov2_config(size: str, registers: bool = False, **overrides: Any) -> DinoConfig:
    """Config of a released DINOv2 model by name (``vits14`` ... ``vitg14``).

    ``registers=True`` gives the 4-register variant (which, as in transformers, uses
    antialiased position interpolation). ``overrides`` replace any field.
    """
    if size not in _SIZES:
        raise ValueError(f"unknown DINOv2 size {size!r}; expected one of {DINO_SIZES}")
    fields: dict[str, Any] = dict(
        patch_size=14,
        image_size=518,
        num_register_tokens=4 if registers else 0,
        interpolate_antialias=registers,
    )
    fields.update(_SIZES[size])
    fields.update(overrides)
    return DinoConfig(**fields)


# ----------------------------------------------------------------------------------
# Position-embedding interpolation (torch bicubic, align_corners=False, size=...).


def _cubic_kernel(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.cache
def bicubic_resize_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """(n_out, n_in) float32 matrix equal to torch's 1-D bicubic resize.

    Without antialias torch uses Keys' kernel with a=-0.75 and clamps taps to the
    border; with antialias it uses a=-0.5, widens the kernel by the downscale factor
    and renormalises the weights over in-range taps (PIL style). Source coordinates
    are computed in float32 as torch does; the weights in float64.
    """
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    w = np.zeros((n_out, n_in), np.float64)
    if not antialias:
        for i in range(n_out):
            src = scale * (f32(i) + f32(0.5)) - f32(0.5)
            base = int(np.floor(src))
            t = float(src - f32(base))
            coeffs = _cubic_kernel(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
            for j, c in enumerate(coeffs):
                w[i, min(max(base - 1 + j, 0), n_in - 1)] += c
        return w.astype(np.float32)
    support = f32(2.0) * scale if scale >= 1 else f32(2.0)
    inv_scale = float(f32(1.0) / scale) if scale >= 1 else 1.0
    for i in range(n_out):
        center = scale * (f32(i) + f32(0.5))
        lo = max(int(center - support + f32(0.5)), 0)
        hi = min(int(center + support + f32(0.5)), n_in)
        taps = np.arange(lo, hi, dtype=np.float64)
        ws = _cubic_kernel((taps - float(center) + 0.5) * inv_scale, -0.5)
        total = ws.sum()
        w[i, lo:hi] = ws / total if total != 0 else ws
    return w.astype(np.float32)


def interpolate_pos_embed(
    pos_embed: jax.Array, grid_hw: tuple[int, int], antialias: bool
) -> jax.Array:
    """Resize (1, 1 + G*G, D) position embeddings to a (gh, gw) patch grid.

    Follows transformers' ``interpolate_pos_encoding``: the CLS entry is kept, the
    G x G patch grid is bicubically resized in float32; unchanged when the grid
    already matches.
    """
    num_positions = pos_embed.shape[1] - 1
    g = int(round(num_positions**0.5))
    if g * g != num_positions:
        raise ValueError(f"position embeddings with {num_positions} patches are not a square grid")
    gh, gw = grid_hw
    if (gh, gw) == (g, g):
        return pos_embed
    dtype = pos_embed.dtype
    cls_pos = pos_embed[:, :1]
    grid = pos_embed[0, 1:].astype(jnp.float32).reshape(g, g, -1)
    mh = jnp.asarray(bicubic_resize_matrix(g, gh, antialias))
    mw = jnp.asarray(bicubic_resize_matrix(g, gw, antialias))
    hi = jax.lax.Precision.HIGHEST
    grid = jnp.einsum("jb,abd->ajd", mw, grid, precision=hi)
    grid = jnp.einsum("ia,ajd->ijd", mh, grid, precision=hi)
    grid = grid.reshape(1, gh * gw, -1).astype(dtype)
    return jnp.concatenate([cls_pos, grid], axis=1)


# ----------------------------------------------------------------------------------
# Modules.


@flax.struct.dataclass
class DinoOutput:
    """Final-LayerNorm features: CLS (N, D), patches (N, P, D), registers (N, R, D)."""

    cls: jax.Array
    patch_tokens: jax.Array
    register_tokens: jax.Array


class LayerScale(nn.Module):
    """Per-channel residual branch scale (``ls1``/``ls2`` in the hub layout)."""

    init_value: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param(
            "gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32
        )
        return x * gamma.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    config: DinoConfig
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        n, t, d = x.shape
        head_dim = d // cfg.num_heads
        dense = functools.partial(nn.Dense, dtype=self.dtype, precision=self.precision)
        qkv = dense(3 * d, use_bias=cfg.qkv_bias, name="qkv")(x)
        qkv = qkv.reshape(n, t, 3, cfg.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("nqhc,nkhc->nhqk", q, k, precision=self.precision)
        logits = logits.astype(jnp.float32) * (head_dim**-0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("nhqk,nkhc->nqhc", weights, v, precision=self.precision)
        return dense(d, name="proj")(out.reshape(n, t, d))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    config: DinoConfig
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, precision=self.precision)
        x = dense(self.config.mlp_hidden_size, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        return dense(self.config.hidden_size, name="fc2")(x)


class SwiGLUFFN(nn.Module):
    """Fused SwiGLU (ViT-g): w12 -> silu(first half) * second half -> w3."""

    config: DinoConfig
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, precision=self.precision)
        hidden = self.config.mlp_hidden_size
        x12 = dense(2 * hidden, name="w12")(x)
        x = nn.silu(x12[..., :hidden]) * x12[..., hidden:]
        return dense(self.config.hidden_size, name="w3")(x)


class Block(nn.Module):
    """Pre-LN transformer block with LayerScale on both residual branches."""

    config: DinoConfig
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        norm = functools.partial(
            nn.LayerNorm, epsilon=cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False
        )
        kw = dict(config=cfg, dtype=self.dtype, precision=self.precision)
        h = Attention(**kw, name="attn")(norm(name="norm1")(x))
        x = x + LayerScale(cfg.layerscale_value, self.dtype, name="ls1")(h)
        ffn = SwiGLUFFN if cfg.use_swiglu_ffn else Mlp
        h = ffn(**kw, name="mlp")(norm(name="norm2")(x))
        return x + LayerScale(cfg.layerscale_value, self.dtype, name="ls2")(h)


class Dinov2(nn.Module):
    """DINOv2 ViT encoder: NHWC normalised images -> final-LayerNorm CLS/patch tokens.

    ``dtype`` is the compute dtype (parameters stay float32); the position-embedding
    resize and softmax always run in float32.
    """

    config: DinoConfig
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, images: jax.Array) -> DinoOutput:
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.num_channels:
            raise ValueError(
                f"expected NHWC images with {cfg.num_channels} channels, got shape {images.shape}"
            )
        n, h, w, _ = images.shape
        p = cfg.patch_size
        if h < p or w < p:
            raise ValueError(f"images {h}x{w} are smaller than one {p}x{p} patch")
        d = cfg.hidden_size
        x = nn.Conv(
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            precision=self.precision,
            name="patch_embed",
        )(images.astype(self.dtype))
        gh, gw = x.shape[1], x.shape[2]
        x = x.reshape(n, gh * gw, d)

        trunc = nn.initializers.truncated_normal(0.02)
        cls_token = self.param("cls_token", trunc, (1, 1, d), jnp.float32)
        pos_embed = self.param(
            "pos_embed", trunc, (1, cfg.grid_size * cfg.grid_size + 1, d), jnp.float32
        )
        cls = jnp.broadcast_to(cls_token.astype(self.dtype), (n, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        pos = interpolate_pos_embed(pos_embed, (gh, gw), cfg.interpolate_antialias)
        x = x + pos.astype(self.dtype)

        r = cfg.num_register_tokens
        if r:
            reg = self.param("register_tokens", nn.initializers.zeros, (1, r, d), jnp.float32)
            reg = jnp.broadcast_to(reg.astype(self.dtype), (n, r, d))
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)

        for i in range(cfg.num_layers):
            x = Block(cfg, self.dtype, self.precision, name=f"blocks_{i}")(x)
        x = nn.LayerNorm(
            epsilon=cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False, name="norm"
        )(x)
        return DinoOutput(cls=x[:, 0], patch_tokens=x[:, 1 + r :], register_tokens=x[:, 1 : 1 + r])

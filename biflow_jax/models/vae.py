"""The KL-regularised image autoencoder of Stable Diffusion, in Flax Linen.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", arXiv:2112.10752) trains generative models in the latent space of a
convolutional autoencoder whose posterior is a diagonal Gaussian with a small KL penalty.
Flows and diffusion models that work on SD latents need that exact autoencoder, so this
module reproduces diffusers' ``AutoencoderKL`` forward pass to float32 round-off:

* Encoder: ``conv_in``, one ``DownEncoderBlock2D`` per entry of ``block_out_channels``
  (``layers_per_block`` ResNet blocks, then a stride-2 conv on all but the last block),
  a mid block (ResNet, single-head self-attention, ResNet), GroupNorm, SiLU and
  ``conv_out`` to ``2 * latent_channels`` moments (mean and log-variance).
* ``quant_conv`` / ``post_quant_conv``: 1x1 convs around the latent (optional).
* Decoder: ``conv_in``, the mid block, one ``UpDecoderBlock2D`` per level in reverse
  (``layers_per_block + 1`` ResNet blocks, then nearest 2x upsampling and a conv on all
  but the last block), GroupNorm, SiLU and ``conv_out``.

Images are NHWC in [-1, 1]. Module and parameter names follow diffusers (``.`` becomes
``_`` before an index), so ``biflow_jax.interop.vae_weights`` converts checkpoints by a
flat rename plus kernel transposes. Parameters are float32; ``VAEConfig.dtype`` sets the
compute dtype of convolutions and matmuls, while GroupNorm, the attention softmax and the
posterior statistics stay in float32 (as diffusers' ``force_upcast`` recommends for fp16).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# diffusers builds every GroupNorm of the VAE with this epsilon.
_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` config.json that shape the network.

    Defaults are those of stabilityai/sd-vae-ft-ema (the SD 1.x/2.x VAE). ``scaling_factor``
    and ``shift_factor`` map latents to roughly unit variance for the generative model;
    ``dtype`` is the compute dtype (parameters always stay float32).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 256
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"
    remat: bool = False  # decoder: recompute each ResNet / attention block in the backward pass (not a weight)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {self.block_out_channels}: {bad} not divisible by "
                             f"norm_num_groups {self.norm_num_groups}")
        jnp.dtype(self.dtype)  # raises TypeError for an unknown dtype name

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (one stride-2 conv per level but the last)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


_PRESETS: dict[str, VAEConfig] = {
    # stabilityai/sd-vae-ft-ema: 83,653,863 parameters, 8x downsampling, 4 latent channels.
    "sd-vae-ft-ema": VAEConfig(),
    # A few-thousand-parameter network with every component (attention, shortcuts, up/down) for tests.
    "tiny": VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16),
}


def vae_config(name: str, **overrides: Any) -> VAEConfig:
    """A named preset ("sd-vae-ft-ema" or "tiny"), with optional field overrides (e.g. dtype)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; known: {sorted(_PRESETS)}")
    return dataclasses.replace(_PRESETS[name], **overrides)


def scale_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
    """Posterior latents -> the normalised latents a generative model is trained on."""
    return (z - cfg.shift_factor) * cfg.scaling_factor


def unscale_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
    """The inverse of `scale_latents`: normalised latents -> what `decode` expects."""
    return z / cfg.scaling_factor + cfg.shift_factor


# ----------------------------------------------------------------------------------
# Layers.


def _conv(features: int, kernel: int, name: str | None, dtype: Dtype, stride: int = 1, padding: Any = None) -> nn.Conv:
    """A conv with torch's symmetric 'same' padding (k // 2) unless `padding` is given."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=dtype, param_dtype=jnp.float32, name=name)


def _norm_silu(x: jax.Array, groups: int, name: str, dtype: Dtype, act: bool = True) -> jax.Array:
    """GroupNorm (statistics and affine in float32, two-pass variance like torch), optional SiLU."""
    norm = nn.GroupNorm(num_groups=groups, epsilon=_NORM_EPS, dtype=jnp.float32, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)
    y = norm(x.astype(jnp.float32))
    if act:
        y = nn.silu(y)
    return y.astype(dtype)


class ResnetBlock2D(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice, 1x1 shortcut on a width change."""

    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _norm_silu(x, self.groups, "norm1", self.dtype)
        h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
        h = _norm_silu(h, self.groups, "norm2", self.dtype)
        h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)  # dropout is 0 in the VAE
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return x + h


class Attention(nn.Module):
    """Single-head spatial self-attention with a GroupNorm on the input and a residual connection.

    The head dimension is the full channel width, as in diffusers' VAE mid block.
    """

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = _norm_silu(x, self.groups, "group_norm", self.dtype, act=False).reshape(b, h * w, c)

        def dense(name: str) -> nn.Dense:
            return nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)

        q, k, v = dense("to_q")(y), dense("to_k")(y), dense("to_v")(y)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v)
        out = dense("to_out_0")(out).reshape(b, h, w, c)
        return x + out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right only (diffusers' (0, 1, 0, 1))."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(self.channels, 3, "conv", self.dtype, stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, "conv", self.dtype)(x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` ResNet blocks (the first changes the width), then an optional Downsample2D."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` ResNet blocks (the first changes the width), then an optional Upsample2D."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        for i in range(self.num_layers):
            x = block(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class UNetMidBlock2D(nn.Module):
    """ResNet, (optional) self-attention, ResNet at the lowest resolution: the only global mixing in the VAE."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        attention = nn.remat(Attention) if self.remat else Attention
        x = block(self.channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = attention(self.groups, self.dtype, name="attentions_0")(x)
        return block(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
    """Image (NHWC) -> 2 * latent_channels moments at 1 / downsample_factor resolution."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        channels = cfg.block_out_channels
        x = _conv(channels[0], 3, "conv_in", dtype)(x.astype(dtype))
        for i, ch in enumerate(channels):
            x = DownEncoderBlock2D(ch, cfg.layers_per_block, cfg.norm_num_groups, i < len(channels) - 1, dtype,
                                   name=f"down_blocks_{i}")(x)
        x = UNetMidBlock2D(channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, dtype,
                           name="mid_block")(x)
        x = _norm_silu(x, cfg.norm_num_groups, "conv_norm_out", dtype)
        return _conv(2 * cfg.latent_channels, 3, "conv_out", dtype)(x)


class Decoder(nn.Module):
    """Latent (NHWC) -> image at downsample_factor times the resolution."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        channels = tuple(reversed(cfg.block_out_channels))
        x = _conv(channels[0], 3, "conv_in", dtype)(z.astype(dtype))
        x = UNetMidBlock2D(channels[0], cfg.norm_num_groups, cfg.mid_block_add_attention, dtype, cfg.remat,
                           name="mid_block")(x)
        for i, ch in enumerate(channels):
            x = UpDecoderBlock2D(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(channels) - 1, dtype,
                                 cfg.remat, name=f"up_blocks_{i}")(x)
        x = _norm_silu(x, cfg.norm_num_groups, "conv_norm_out", dtype)
        return _conv(cfg.out_channels, 3, "conv_out", dtype)(x)


class AutoencoderKL(nn.Module):
    """Stable Diffusion's KL autoencoder (Rombach et al. 2022, arXiv:2112.10752).

    ``encode`` gives the diagonal Gaussian posterior (mean, std) and ``decode`` maps a latent
    back to an image; both return float32. ``__call__`` decodes the posterior mean so that
    ``init`` creates every parameter. Latents are unscaled; see `scale_latents`.
    """

    cfg: VAEConfig

    def setup(self) -> None:
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = _conv(2 * cfg.latent_channels, 1, None, dtype) if cfg.use_quant_conv else None
        self.post_quant_conv = (_conv(cfg.latent_channels, 1, None, dtype)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, in_channels) in [-1, 1] -> posterior (mean, std), each (B, H/f, W/f, latent)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        # diffusers clamps the log-variance before exponentiating; keep that for identical std.
        std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
        return mean, std

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels), float32."""
        z = z.astype(self.cfg.compute_dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean (deterministic)."""
        mean, _ = self.encode(x)
        return self.decode(mean)

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """(z - shift_factor) * scaling_factor, from the config (needs no parameters)."""
        return scale_latents(z, self.cfg)

    def unscale_latents(self, z: jax.Array) -> jax.Array:
        """z / scaling_factor + shift_factor, from the config (needs no parameters)."""
        return unscale_latents(z, self.cfg)

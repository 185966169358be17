"""VGG16 features and the LPIPS perceptual distance in Flax Linen.

BiFlow (arXiv:2512.10953) trains its reverse model with perceptual losses; one of them is
LPIPS (Zhang et al., arXiv:1801.03924) on a VGG16 trunk (Simonyan & Zisserman,
arXiv:1409.1556). The distance is: shift/scale the [-1, 1] input, take five VGG16 ReLU
taps, unit-normalise each pixel's channel vector, square the differences, weigh channels
with the learned non-negative 1x1 calibration, average over space and sum over taps.

Parameter names follow torchvision's ``vgg16().features`` (conv ``features_{N}`` at the
same indices N as there) and the lpips package (``lin{k}``), so loading is a flat rename;
see ``biflow_jax.interop.lpips_weights``. Images are NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision's VGG16 "D" configuration: conv widths, "M" = 2x2 max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                        512, 512, 512, "M", 512, 512, 512)

TAP_NAMES: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)

# LPIPS v0.1 input scaling (the lpips package's ScalingLayer): (x - shift) / scale, per RGB channel.
LPIPS_SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
LPIPS_SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)


def vgg16_conv_indices() -> tuple[int, ...]:
    """Indices of the convolutions in torchvision's ``vgg16().features`` (each is followed by a ReLU)."""
    indices, index = [], 0
    for item in VGG16_LAYOUT:
        if item == "M":
            index += 1
        else:
            indices.append(index)
            index += 2
    return tuple(indices)


class VGG16Features(nn.Module):
    """The convolutional trunk of VGG16 up to relu5_3, returning the five LPIPS taps.

    The final max-pool (torchvision index 30) is omitted: no tap needs it.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        taps = []
        x = x.astype(self.dtype)
        conv_indices = iter(vgg16_conv_indices())
        for item in VGG16_LAYOUT:
            if item == "M":
                taps.append(x)  # the ReLU output just before each pool is a tap
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            else:
                x = nn.Conv(int(item), (3, 3), padding=1, dtype=self.dtype, name=f"features_{next(conv_indices)}")(x)
                x = nn.relu(x)
        taps.append(x)
        return tuple(taps)


def unit_normalize(features: jax.Array, eps: float = 1e-10) -> jax.Array:
    """Each pixel's channel vector divided by (its L2 norm + eps), as the lpips package does.

    An all-zero tap has an infinite sqrt slope at 0, but the ReLU that produced it passes no
    gradient there (jax.nn.relu selects, like torch), so gradients stay finite.
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
    return features / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS distance (arXiv:1801.03924, v0.1, VGG trunk) between image pairs.

    ``__call__(x0, x1)`` takes two NHWC batches in [-1, 1] and returns a (batch,) float32
    distance. Both batches go through the trunk as one batch of 2B images. The calibration
    weights ``lin{k}/kernel`` (C, 1) are applied as given; the published ones are non-negative
    (lpips clamps them while training). ``dtype`` is the trunk's compute dtype; the
    normalisation and distance are computed in float32.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        if x0.shape != x1.shape:
            raise ValueError(f"LPIPS needs equally shaped image batches, got {x0.shape} and {x1.shape}")
        batch = x0.shape[0]
        x = jnp.concatenate([x0, x1], axis=0).astype(jnp.float32)
        x = (x - jnp.asarray(LPIPS_SHIFT, jnp.float32)) / jnp.asarray(LPIPS_SCALE, jnp.float32)
        taps = VGG16Features(dtype=self.dtype, name="vgg")(x)
        distance = jnp.zeros((batch,), jnp.float32)
        for k, tap in enumerate(taps):
            tap = unit_normalize(tap.astype(jnp.float32))
            diff = jnp.square(tap[:batch] - tap[batch:])
            # The 1x1 calibration conv. Initialised to ones: uncalibrated, it is lpips's `lpips=False` baseline.
            weighted = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.ones, name=f"lin{k}")(diff)
            distance = distance + jnp.mean(weighted[..., 0], axis=(1, 2))
        return distance

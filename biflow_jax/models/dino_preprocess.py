"""Map generator-range images to what a DINOv2 encoder expects."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def preprocess_for_dino(images: jax.Array, resolution: int = 224) -> jax.Array:
    """NHWC RGB in [-1, 1] -> ImageNet-normalised, bicubic-resized to resolution^2.

    DINOv2 was trained on ImageNet-normalised [0, 1] images; the resize uses
    ``jax.image.resize(method="cubic")`` (antialiased when downscaling). Shapes are
    static, so this jits.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    n, _, _, c = x.shape
    return jax.image.resize(x, (n, resolution, resolution, c), method="cubic")

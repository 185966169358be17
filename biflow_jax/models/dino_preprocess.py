"""Map generator-range images to what a DINOv2 encoder expects."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from biflow_jax.models.dino import bicubic_resize_matrix

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def preprocess_for_dino(images: jax.Array, resolution: int = 224, antialias: bool = False) -> jax.Array:
    """NHWC RGB in [-1, 1] -> ImageNet-normalised, bicubic-resized to resolution^2.

    DINOv2 was trained on ImageNet-normalised [0, 1] images. The resize applies torch's
    bicubic weights exactly (``bicubic_resize_matrix``, one matrix per axis):
    ``antialias=False`` (default) is ``F.interpolate(x, resolution, mode="bicubic")``, the
    encoder preprocessing of REPA-style alignment (Keys a = -0.75, clamped borders), which
    ``jax.image.resize("cubic")`` (a = -0.5) missed by several % of the signal;
    ``antialias=True`` is the PIL-style resize of transformers' DINOv2 processor. Shapes are
    static, so this jits.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    _, h, w, _ = x.shape
    rows = jnp.asarray(bicubic_resize_matrix(h, resolution, antialias))
    cols = jnp.asarray(bicubic_resize_matrix(w, resolution, antialias))
    return jnp.einsum("yh,nhwc,xw->nyxc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)

"""ADM's centre crop (Dhariwal & Nichol, arXiv:2105.05233), the one resize every image path uses.

ADM's reference batches (the VIRTUAL_* files FID is scored against) were made by halving the
image with a box filter while its short side is at least twice the target, resizing it with
PIL's bicubic filter so that the short side equals the target, and cutting the centre square.
The training input pipeline, the reference statistics (`evaluators.ref_stats`, which reads
through the pipeline) and the latent encoder (`data.latents.encode`) all call this module, so a
model is trained and scored on images made the way the reference's were. Pure numpy + PIL:
tf.data reaches it through `tf.numpy_function` (`data.input_pipeline`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

MODES = {1: "L", 3: "RGB"}


def center_crop_pil(image: Any, size: int) -> np.ndarray:
    """A PIL image (any size, either orientation) -> uint8 (size, size[, C]) array, ADM's way."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def center_crop_adm(image: Any, size: int) -> np.ndarray:
    """A PIL image -> uint8 (size, size, 3): converted to RGB first, as ADM's loader does."""
    return center_crop_pil(image.convert("RGB"), size)


def center_crop_array(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, C) with C = 1 or 3 -> uint8 (size, size, C), ADM's centre crop per channel set."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in MODES:
        raise ValueError(f"ADM's centre crop takes (H, W, 1) or (H, W, 3) uint8 images, got shape {image.shape}")
    if image.shape[0] == size and image.shape[1] == size:
        return np.ascontiguousarray(image, np.uint8)
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image, MODES[channels])
    out = center_crop_pil(pil, size)
    return out.reshape(size, size, channels)

"""ADM's centre crop: the input pipeline's tf.data path, the array and PIL entry points, against a
transcription of guided-diffusion's `center_crop_arr` (image_datasets.py), within 1/255.

Odd sizes in both orientations: a bicubic-only shrink (short side < 2x), one and several box
halvings of odd sides, an upsample, and grey images; noise images so every pixel counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from biflow_jax.data import adm_resize, input_pipeline, latents

SIZE = 16
SHAPES = [(23, 17), (17, 23), (67, 101), (101, 67), (301, 173), (173, 301), (11, 9)]


def reference_center_crop(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr, transcribed: halve with BOX while the short side is at
    least twice the target, one BICUBIC resize of the short side to the target, centre crop."""
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize((pil_image.size[0] // 2, pil_image.size[1] // 2), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    new_size = (round(pil_image.size[0] * scale), round(pil_image.size[1] * scale))
    arr = np.array(pil_image.resize(new_size, resample=Image.BICUBIC))
    y0, x0 = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y0:y0 + image_size, x0:x0 + image_size]


def noise_images(channels: int) -> list[np.ndarray]:
    rng = np.random.default_rng(channels)
    # Smooth plus noise: box and bicubic filters give different values, so a wrong filter shows.
    out = []
    for h, w in SHAPES:
        ramp = np.add.outer(np.linspace(0, 180, h), np.linspace(0, 60, w))[..., None]
        out.append(np.clip(ramp + rng.integers(0, 70, (h, w, channels)), 0, 255).astype(np.uint8))
    return out


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("channels", [3, 1])
def test_the_pipelines_resize_equals_center_crop_arr_within_one_level(channels):
    images = noise_images(channels)
    ds = tf.data.Dataset.from_generator(lambda: iter(images),
                                        output_signature=tf.TensorSpec((None, None, channels), tf.uint8))
    got = list(ds.map(lambda x: input_pipeline._resize(x, SIZE, channels)).as_numpy_iterator())
    for image, ours in zip(images, got, strict=True):
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        want = reference_center_crop(pil, SIZE).reshape(SIZE, SIZE, channels)
        assert ours.shape == (SIZE, SIZE, channels) and ours.dtype == np.uint8
        assert max_diff(ours, want) <= 1, image.shape
        assert max_diff(ours, adm_resize.center_crop_array(image, SIZE)) == 0
    # The old centre-crop-then-area resize differs, so the check can tell the two apart.
    big = images[4][..., :channels]
    side = min(big.shape[:2])
    top, left = (big.shape[0] - side) // 2, (big.shape[1] - side) // 2
    area = tf.image.resize(big[top:top + side, left:left + side], (SIZE, SIZE), method="area", antialias=True)
    assert max_diff(np.round(area.numpy()).astype(np.uint8), got[4]) > 1


def test_the_latent_encoder_uses_the_same_crop():
    image = noise_images(3)[5]
    want = reference_center_crop(Image.fromarray(image), SIZE)
    assert latents.center_crop_adm is adm_resize.center_crop_adm
    assert max_diff(latents.center_crop_adm(Image.fromarray(image).convert("RGBA"), SIZE), want) <= 1
    with pytest.raises(ValueError, match=r"\(H, W, 1\) or \(H, W, 3\)"):
        adm_resize.center_crop_array(np.zeros((20, 20, 2), np.uint8), SIZE)

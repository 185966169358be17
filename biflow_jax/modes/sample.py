"""The `sample` mode: load a stage-1 flow, generate images with its exact inverse, save them.

Writes `samples.png` (a grid, one row per class for a conditional model) and
`samples.npz` (uint8 NHWC `images` and int `labels`) into `out_dir`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image
from tqdm import tqdm

from biflow_jax import latent_space, runs
from biflow_jax.samplers import exact_inverse

# Defaults for the `sample` config section, used for any field a config lacks.
SAMPLE_DEFAULTS = {
    "num_images": 100,
    "batch_size": 100,
    "guidance": 0.0,
    "guide_what": "ab",
    "annealed": False,
    "attn_temp": 1.0,
    "rule": "cfg",
    "solver": "cached",
    "noise_scale": 1.0,
    "denoise": True,
    "jacobi_tol": 1e-4,
    "jacobi_max_iters": 0,
}


def sample_settings(config: Any) -> dict:
    """config.sample with defaults filled in (the section may be missing or partial)."""
    section = config.get("sample", None) or {}
    return {key: section.get(key, default) for key, default in SAMPLE_DEFAULTS.items()}


def guidance_from_settings(settings: dict) -> exact_inverse.Guidance:
    return exact_inverse.Guidance(
        scale=float(settings["guidance"]), what=settings["guide_what"], annealed=bool(settings["annealed"]),
        attn_temp=float(settings["attn_temp"]), rule=settings["rule"],
    )


def denoise_sigma(config: Any, settings: dict) -> float:
    """The training noise level when the flow learned Gaussian-noised images, else 0 (no step)."""
    train = config.get("train", None) or {}
    if settings["denoise"] and train.get("noise", None) == "gaussian":
        return float(train.get("noise_std", 0.0))
    return 0.0


def save_grid(images: np.ndarray, path: str, nrow: int, padding: int = 2, min_size: int = 32) -> None:
    """Tile uint8 NHWC images, `nrow` per row, into one PNG (grayscale for 1 channel).

    Images smaller than `min_size` pixels are enlarged by an integer factor (nearest
    neighbour), so an 8x8 digit is something a person can look at.
    """
    images = np.asarray(images)
    if images.ndim == 4 and 0 < images.shape[1] < min_size:
        factor = -(-min_size // images.shape[1])
        images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"save_grid wants uint8 NHWC images with 1 or 3 channels, got {images.dtype} "
                         f"{images.shape}")
    n, h, w, c = images.shape
    nrow = max(1, min(nrow, n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def class_rows(images: np.ndarray, labels: np.ndarray, max_cols: int = 16) -> tuple[np.ndarray, int]:
    """Rearrange images into one row per label (sorted), blank cells where a class has fewer."""
    classes = np.unique(labels)
    cols = min(max_cols, max(int(np.sum(labels == c)) for c in classes))
    cells = np.zeros((len(classes) * cols,) + images.shape[1:], images.dtype)
    for r, c in enumerate(classes):
        chosen = images[labels == c][:cols]
        cells[r * cols:r * cols + len(chosen)] = chosen
    return cells, cols


def default_labels(num_images: int, num_classes: int) -> np.ndarray:
    """Class-balanced labels 0, 1, ..., K-1, 0, 1, ... (uniform over classes, a full grid)."""
    return np.arange(num_images) % num_classes


def run_sample(workdir: str, sampler: str = "exact", num_images: int | None = None,
               labels: Sequence[int] | None = None, out_dir: str | None = None, solver: str | None = None,
               ema: bool = True, seed: int = 0, config: Any = None) -> dict:
    """Generate `num_images` images from the stage-1 flow in `workdir`; returns paths and throughput
    (`seconds` and `images_per_s` include compilation).

    labels: one per image (cycled if shorter); None gives class-balanced labels for a
    conditional model. solver / num_images None take config.sample's values.
    """
    try:
        run = runs.load_flow(workdir, ema)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"cannot sample: no stage-1 flow checkpoint in workdir {workdir!r} ({err})") from err
    config_loaded, model, params = run.config, run.model, run.params
    # Sampling settings come from the given config; the training noise from the run's own config.
    config = config if config is not None else config_loaded
    trained = config_loaded if config_loaded is not None else config

    settings = sample_settings(config)
    num_images = int(num_images or settings["num_images"])
    solver = solver or settings["solver"]
    guidance = guidance_from_settings(settings)
    sigma = denoise_sigma(trained, settings)
    exact_inverse.check_guidance(model, guidance)

    if labels is not None:
        all_labels = np.resize(np.asarray(labels, np.int32), num_images)
    elif model.num_classes:
        all_labels = default_labels(num_images, model.num_classes).astype(np.int32)
    else:
        all_labels = None
    if all_labels is not None:
        exact_inverse.check_labels(model, all_labels)

    decoder = latent_space.load_decoder(config)
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("batch",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    per_step = min(int(settings["batch_size"]), num_images)
    per_step = -(-per_step // len(devices)) * len(devices)  # a multiple of the device count

    rng = jax.random.PRNGKey(seed)
    token_shape = (model.num_tokens, model.token_dim)
    chunks = []
    start = time.perf_counter()
    for first in tqdm(range(0, num_images, per_step), desc="sampling", unit="batch"):
        count = min(per_step, num_images - first)
        z = settings["noise_scale"] * jax.random.normal(jax.random.fold_in(rng, first), (per_step,) + token_shape)
        z = jax.device_put(z, batch_sharding)
        y = None
        if all_labels is not None:
            step_labels = np.zeros(per_step, np.int32)  # padding rows are generated, then dropped
            step_labels[:count] = all_labels[first:first + count]
            y = jax.device_put(jnp.asarray(step_labels), batch_sharding)
        images = exact_inverse.generate(model, params, z, y, guidance, solver, sigma,
                                   settings["jacobi_tol"], settings["jacobi_max_iters"])
        # a latent run's samples are latents: decoded through the frozen VAE
        chunks.append((decoder.to_uint8(images) if decoder else exact_inverse.images_to_uint8(images))[:count])
    seconds = time.perf_counter() - start
    images = np.concatenate(chunks)

    out_dir = out_dir or os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    png_path, npz_path = os.path.join(out_dir, "samples.png"), os.path.join(out_dir, "samples.npz")
    saved_labels = all_labels if all_labels is not None else np.full(num_images, -1, np.int32)
    np.savez(npz_path, images=images, labels=saved_labels)
    if all_labels is not None:
        cells, cols = class_rows(images, all_labels)
        save_grid(cells, png_path, cols)
    else:
        save_grid(images, png_path, math.ceil(math.sqrt(num_images)))

    return {
        "samples_png": png_path,
        "samples_npz": npz_path,
        "num_images": num_images,
        "solver": solver,
        "guidance": guidance.scale,
        "denoise_sigma": sigma,
        "seconds": seconds,
        "images_per_s": num_images / seconds,
    }

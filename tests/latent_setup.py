"""Shared set-up for latent-space tests: a generated image folder, a tiny random VAE saved as a
diffusers directory, and configs/imagenet256_latent.py:smoke pointed at them."""

import os

import jax
import numpy as np
from helpers.paths import REPO
from PIL import Image


def make_images(root: str, counts=(("train", 6), ("test", 2))) -> str:
    """FOLDER/<split>/<class>/*.png: two classes, random RGB images of varied (non-square) sizes."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "images")
    for split, n in counts:
        for c in ("cat", "dog"):
            os.makedirs(os.path.join(folder, split, c), exist_ok=True)
            for i in range(n // 2):
                h, w = rng.integers(16, 48, 2)
                image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(image).save(os.path.join(folder, split, c, f"{i}.png"))
    return folder


def make_vae(root: str) -> str:
    """A random 'tiny' VAE (2 levels: 16x16 images <-> 8x8x4 latents) written with our diffusers writer,
    every tensor perturbed (walk_setup.write_vae says why zero biases are no test of a VAE)."""
    from helpers.params import perturbed

    from biflow_jax.interop.vae_weights import save_vae
    from biflow_jax.models.vae import AutoencoderKL, vae_config

    cfg = vae_config("tiny")
    params = perturbed(AutoencoderKL(cfg).init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"])
    path = os.path.join(root, "vae")
    save_vae(path, cfg, params)
    return path


def smoke_config(root: str, images: str, vae: str):
    from biflow_jax import config_files

    config = config_files.load(f"{REPO}/configs/imagenet256_latent.py:smoke")
    return config_files.apply_overrides(config, [f"latent.source.folder={images}", f"latent.vae_path={vae}",
                                                 f"data.folder={os.path.join(root, 'latents')}"])

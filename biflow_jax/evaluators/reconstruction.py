"""How well BiFlow's G inverts the forward flow on held-out data: test MSE of G(F(x~)) against x.

G is trained on the trajectory of noised inputs x~ (the flow's training noise), so the
evaluation feeds F the same kind of input, with fixed per-example noise, and compares G's
final output with the clean image tokens (BiFlow, arXiv:2512.10953, learned denoising).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from biflow_jax import latent_space, likelihood, sharding
from biflow_jax.evaluators.common import masked_mean
from biflow_jax.models.tarflow import patchify

EVAL_SEED_OFFSET = 7919


def noised_inputs(images_uint8: jax.Array, index: jax.Array, noise: str, noise_std: float,
                  seed: int) -> jax.Array:
    """The flow's training-noise version of clean uint8 images, with fixed per-example keys."""
    keys = sharding.example_keys(jax.random.key(seed + EVAL_SEED_OFFSET), index)
    return jax.vmap(lambda k, im: likelihood.augment(k, im, noise, noise_std))(keys, images_uint8)


class Reconstruction:
    """Evaluator: mean per-example MSE of G(F(x~)) against the clean image tokens."""

    name = "reconstruction"

    def __init__(self, config: Any, flow_run: Any, reverse: Any, mesh: Mesh, every: int):
        self.every, self.config, self.mesh, self.flow_params = every, config, mesh, flow_run.params
        flow, noise = flow_run.model, flow_run.config.train
        latent = config.latent if latent_space.enabled(config) else None

        @jax.jit
        def mse(params, flow_params, images, labels, offset):
            index = offset + jnp.arange(images.shape[0])
            if latent is None:
                x = noised_inputs(images, index, noise.noise, noise.noise_std, config.biflow.train.seed)
                clean = patchify(likelihood.to_unit_range(images), flow.patch_size)
            else:  # latents: the posterior means, noised as in training
                keys = sharding.example_keys(jax.random.key(config.biflow.train.seed + EVAL_SEED_OFFSET), index)
                x, clean_x = latent_space.noised_mean_latents(keys, images, noise.noise_std, latent)
                clean = patchify(clean_x, flow.patch_size)
            y = labels if flow.num_classes else None
            z = flow.apply(flow_params, x, y).z
            out = reverse.apply(params, z, y, None).image_tokens
            return jnp.mean(jnp.square(out - clean), axis=(1, 2))

        self.mse = mse

    def __call__(self, params: Any) -> dict[str, float]:
        value = masked_mean(lambda g, offset: self.mse(params, self.flow_params, g["image"], g["label"], offset),
                            self.config.data, self.config.biflow.train.eval_batch_size, self.mesh)
        return {"test_recon_mse": value}

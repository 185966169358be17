"""Diagonal-Gaussian baseline: the simplest flow, z = (x - mu) / sigma per dimension.

It returns the same (z, logdets) as TARFlow so bits/dim run through the same code;
any flow worth training must beat it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax.models.tarflow import patchify


class DiagonalGaussian:
    """Closed-form maximum-likelihood fit of an independent Gaussian per token dimension."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, patch_size: int):
        self.mean, self.std, self.patch_size = jnp.asarray(mean), jnp.asarray(std), patch_size

    @classmethod
    def fit(cls, images: np.ndarray, patch_size: int, min_std: float = 1e-3) -> DiagonalGaussian:
        """images: (N, H, W, C) float in [-1, 1], already dequantised like the flow's inputs."""
        tokens = np.asarray(patchify(jnp.asarray(images, jnp.float32), patch_size), np.float64)
        return cls(tokens.mean(0), np.maximum(tokens.std(0), min_std), patch_size)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> z tokens and a (N, 1) log|det| per dimension, the shapes TARFlow's output has."""
        z = (patchify(x, self.patch_size) - self.mean) / self.std
        logdet = -jnp.mean(jnp.log(self.std)) * jnp.ones((x.shape[0], 1))
        return z, logdet

"""Maximum-likelihood objective of the forward flow: dequantisation, NLL and bits/dim.

Constants follow ml-tarflow: the training loss drops the Gaussian constant; bits/dim
adds it back plus log(128) for the [-1, 1] scaling of 8-bit data, then divides by ln 2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

NOISE_TYPES = ("gaussian", "uniform", "none")


def to_unit_range(images_uint8: Array) -> Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def uniform_dequantize(rng: Array, images_uint8: Array) -> Array:
    """(k + u) / 128 - 1 with u ~ U[0, 1): a continuous density whose bits/dim bound the discrete one."""
    u = jax.random.uniform(rng, images_uint8.shape, jnp.float32)
    return (images_uint8.astype(jnp.float32) + u) / 128.0 - 1.0


def augment(rng: Array, images_uint8: Array, noise: str, noise_std: float) -> Array:
    """The training input x~: Gaussian noise augmentation (TARFlow) or uniform dequantisation."""
    if noise == "gaussian":
        x = to_unit_range(images_uint8)
        return x + noise_std * jax.random.normal(rng, x.shape, x.dtype)
    if noise == "uniform":
        return uniform_dequantize(rng, images_uint8)
    if noise == "none":
        return to_unit_range(images_uint8)
    raise ValueError(f"train.noise must be one of {NOISE_TYPES}, got {noise!r}")


def nll_loss(z: Array, logdets: Array) -> Array:
    """Training loss per dimension: 0.5 * mean(z^2) - mean_batch(sum_blocks logdet)."""
    return 0.5 * jnp.mean(jnp.square(z)) - jnp.mean(jnp.sum(logdets, axis=-1))


def nll_per_sample(z: Array, logdets: Array) -> Array:
    """-log N(z; 0, I) / dims - log|det| / dims, per sample (nats)."""
    gauss = 0.5 * jnp.mean(jnp.square(z).reshape(z.shape[0], -1), axis=-1) + 0.5 * math.log(2 * math.pi)
    return gauss - jnp.sum(logdets, axis=-1)


def bits_per_dim(z: Array, logdets: Array) -> Array:
    """Per-sample bits/dim of 8-bit data scaled to [-1, 1] (ml-tarflow's evaluate_bpd)."""
    return (nll_per_sample(z, logdets) + math.log(128.0)) / math.log(2.0)

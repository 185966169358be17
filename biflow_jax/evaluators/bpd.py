"""Test bits/dim of the forward flow, and a diagonal-Gaussian baseline scored the same way.

Bits/dim (TARFlow, arXiv:2412.06329, sec. 4) is a bound on discrete data only under uniform
dequantisation, so that is what `test_bpd` always measures, with fixed per-example noise.
A flow trained on Gaussian-noised images (train.noise='gaussian') is a density of noised
images: for it the evaluator reports `test_bpd_uniform_dequantised` (the same number,
named for what it is: a model of another noise scored on uniform dequantisation) and
`test_bpd_train_noise`, the NLL in bits/dim of images under the training noise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from biflow_jax import likelihood, sharding
from biflow_jax.data import input_pipeline
from biflow_jax.evaluators.common import masked_mean
from biflow_jax.models.gaussian import DiagonalGaussian

EVAL_SEED_OFFSET = 7919  # eval noise differs from any training step's noise


def make_bpd_fn(apply_fn: Callable, mesh: Mesh, seed: int, noise: str = "uniform",
                noise_std: float = 0.0) -> Callable:
    """Jitted per-example bits/dim of a batch: bpd(params, images, labels, offset) -> (N,).

    apply_fn(params, x, y) -> (z, logdets): the flow, or any baseline with the same outputs.
    noise: 'uniform' dequantisation, or 'gaussian' with noise_std (the training noise).
    """
    batch_sharding = NamedSharding(mesh, P(sharding.AXIS))

    @functools.partial(jax.jit, in_shardings=(None, batch_sharding, batch_sharding, None))
    def bpd(params, images, labels, offset):
        index = offset + jnp.arange(images.shape[0])
        keys = sharding.example_keys(jax.random.key(seed + EVAL_SEED_OFFSET), index)
        if noise == "gaussian":
            x = jax.vmap(lambda k, im: likelihood.augment(k, im, "gaussian", noise_std))(keys, images)
        else:
            x = jax.vmap(likelihood.uniform_dequantize)(keys, images)
        z, logdets = apply_fn(params, x, labels)
        return likelihood.bits_per_dim(z, logdets)

    return bpd


def flow_apply(model) -> Callable:
    def apply(params, x, y):
        out = model.apply(params, x, y if model.num_classes else None)
        return out.z, out.logdets

    return apply


def split_bpd(bpd_fn: Callable, params: Any, data: Any, batch_size: int, mesh: Mesh,
              split: str | None = None) -> float:
    """Mean bits/dim over a whole split."""
    return masked_mean(lambda g, offset: bpd_fn(params, g["image"], g["label"], offset), data, batch_size, mesh,
                       split)


class BitsPerDim:
    """Evaluator: test bits/dim of the flow inside the stage's trainable params."""

    name = "bpd"

    def __init__(self, config: Any, model: Any, flow_params: Callable[[Any], Any], mesh: Mesh, every: int):
        self.every = every
        self.config, self.mesh, self.flow_params = config, mesh, flow_params
        t = config.train
        self.uniform = make_bpd_fn(flow_apply(model), mesh, t.seed)
        self.gaussian = (make_bpd_fn(flow_apply(model), mesh, t.seed, "gaussian", t.noise_std)
                         if t.noise == "gaussian" else None)

    def __call__(self, params: Any) -> dict[str, float]:
        flow = self.flow_params(params)
        size = self.config.train.eval_batch_size
        uniform = split_bpd(self.uniform, flow, self.config.data, size, self.mesh)
        if self.gaussian is None:
            return {"test_bpd": uniform}
        return {"test_bpd_uniform_dequantised": uniform,
                "test_bpd_train_noise": split_bpd(self.gaussian, flow, self.config.data, size, self.mesh)}


def gaussian_baseline_bpd(config: Any, mesh: Mesh) -> float:
    """Bits/dim of a diagonal Gaussian fitted to the dequantised training set, same eval path."""
    images, _ = input_pipeline.split_arrays(config.data, config.data.train_split)
    x = likelihood.uniform_dequantize(jax.random.key(config.train.seed), jnp.asarray(images))
    baseline = DiagonalGaussian.fit(np.asarray(x), config.model.patch_size)
    bpd_fn = make_bpd_fn(lambda params, x, y: baseline(x), mesh, config.train.seed)
    return split_bpd(bpd_fn, {}, config.data, config.train.eval_batch_size, mesh)

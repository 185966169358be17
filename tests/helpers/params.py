"""Params trees whose every leaf carries information, so a wrong transpose, split or gate shows in the numbers.

Zero-initialised output layers (TARFlow's proj_out, G's adaLN gates and stage heads) would make a
model the identity and hide bugs. Noise comes from numpy: eager jax.random would compile one kernel
per leaf shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def perturbed(params: Any, scale: float = 0.05, seed: int = 7) -> Any:
    """`params` plus `scale` * N(0, 1) on every leaf (a ShapeDtypeStruct counts as zeros), dtypes kept."""
    rng = np.random.default_rng(seed)

    def noisy(leaf):
        base = np.zeros(leaf.shape) if isinstance(leaf, jax.ShapeDtypeStruct) else np.asarray(leaf, np.float64)
        return jnp.asarray(base + scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map(noisy, params)


def random_params(shapes: Any, seed: int, gains: Mapping[str, float] | None = None) -> Any:
    """A tree of the shapes' structure (e.g. from `jax.eval_shape(model.init, ...)`), every leaf random at
    a scale for its role: kernels ~ 1/sqrt(fan-in), norm scales ~ 1, biases ~ 0.1, embeddings ~ 0.5.

    gains: module name -> factor on the kernels and biases of every module whose path names it
    (e.g. {"proj_out": 0.1}).
    """
    rng = np.random.default_rng(seed)
    gains = dict(gains or {})

    def fill(path, leaf):
        names = [p.key for p in path]
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        gain = next((g for name, g in gains.items() if name in names), 1.0)
        if names[-1] == "kernel":
            return jnp.asarray(noise * gain / math.sqrt(leaf.shape[0]))
        if names[-1] == "scale":
            return jnp.asarray(1.0 + 0.2 * noise)
        if names[-1] == "bias":
            return jnp.asarray(0.1 * gain * noise)
        return jnp.asarray(0.5 * noise)  # position and label tables

    return jax.tree_util.tree_map_with_path(fill, shapes)

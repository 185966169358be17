"""REPA's projector: the small MLP that maps a generator's hidden states to the frozen encoder's
feature width, so that a cosine can compare them (Yu et al., REPA, arXiv:2410.06940; R-REPA
aligns a flow's states the same way, arXiv:2511.22345)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class Projector(nn.Module):
    """Flow hidden (C) -> encoder width: Linear, SiLU, Linear, SiLU, Linear (REPA's MLP)."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, h: Array) -> Array:
        h = nn.silu(nn.Dense(self.hidden, name="fc1")(h.astype(jnp.float32)))
        h = nn.silu(nn.Dense(self.hidden, name="fc2")(h))
        return nn.Dense(self.out, name="fc3")(h)

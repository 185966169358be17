"""Optimisation: the learning-rate schedule, AdamW and the EMA of the weights.

TARFlow (arXiv:2412.06329) and BiFlow (arXiv:2512.10953) train with AdamW, a linear
warm-up then cosine decay, and evaluate an exponential moving average of the weights.
Every function takes the stage's own `train` / `optim` config sections, so stage 1 and
stage 2 of BiFlow each have theirs and nothing is rewritten at run time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_schedule(optim: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    """Linear warm-up from init_lr to lr, then cosine decay to end_lr at `steps`."""
    warmup = optax.linear_schedule(optim.init_lr, optim.lr, max(optim.warmup_steps, 1))
    decay_steps = max(steps - optim.warmup_steps, 1)
    cosine = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr / optim.lr if optim.lr else 0.0)
    return optax.join_schedules([warmup, cosine], [optim.warmup_steps])


def make_optimizer(optim: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
    """AdamW on the schedule, after an optional global-norm clip (optim.grad_clip > 0)."""
    parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    parts.append(optax.adamw(make_schedule(optim, steps), b1=optim.b1, b2=optim.b2,
                             weight_decay=optim.weight_decay))
    return optax.chain(*parts)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The EMA decay used after `step` updates.

    With warm-up the decay is min(decay, (1 + step) / (10 + step)): early averages forget
    the random initialisation quickly, which matters for short runs (the digits job) and
    is harmless for long ones. Without it the decay is constant from the first step.
    """
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema: Any, params: Any, decay: jax.Array) -> Any:
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)

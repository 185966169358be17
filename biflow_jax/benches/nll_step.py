"""The plain flow train step the versus_torch and compile benches time: NLL, backward, AdamW.

ml-tarflow's optimiser settings (AdamW, betas (0.9, 0.95), weight decay 1e-4), so the step
matches the PyTorch reference it is compared with; the trainer's own step (EMA, sharding,
schedules) is what the train bench times instead.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from biflow_jax import likelihood


def adamw() -> optax.GradientTransformation:
    return optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=1e-4)


def nll_step(model: Any, optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
             images: jax.Array, labels: jax.Array | None) -> tuple[Any, Any, jax.Array]:
    """One step: (new params, new optimiser state, the loss before the update)."""

    def loss_fn(p):
        out = model.apply(p, images, labels)
        return likelihood.nll_loss(out.z, out.logdets)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

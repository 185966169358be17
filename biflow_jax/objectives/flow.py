"""Stage 1: maximum likelihood of the forward flow (TARFlow, arXiv:2412.06329, eq. 5).

The loss is the flow's negative log-likelihood per dimension of noised or dequantised
images; labels are dropped to the null class with probability `train.label_drop` so the
same flow serves classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from biflow_jax import latent_space, likelihood
from biflow_jax.config_checks import validate_flow_stage
from biflow_jax.models import registry
from biflow_jax.models.tarflow import TARFlow
from biflow_jax.objectives import Objective
from biflow_jax.sharding import example_keys

SAME_RUN_KEYS = ("model", "data.name")


def validate(config: ml_collections.ConfigDict) -> None:
    """Stage 1's checks (a latent run's are `latent_space.validate`'s, run once for every stage)."""
    validate_flow_stage(config)


def flow_inputs(train: ml_collections.ConfigDict, num_classes: int, batch: dict, keys: jax.Array,
                latent: ml_collections.ConfigDict | None = None):
    """(x~, y): noised/dequantised images and labels with dropout; keys (N, 2) per example.

    `train` is the section holding noise, noise_std and label_drop (stage 1's `train`). A batch
    of VAE posteriors (data.name='latents') gives noised latent samples, scaled by `latent`.
    """
    if latent_space.is_latent_batch(batch):
        x = latent_space.noised_latents(keys[:, 0], batch, train.noise_std, latent)
    else:
        x = jax.vmap(lambda k, im: likelihood.augment(k, im, train.noise, train.noise_std))(keys[:, 0],
                                                                                          batch["image"])
    y = None
    if num_classes:
        drop = jax.vmap(lambda k: jax.random.uniform(k) < train.label_drop)(keys[:, 1])
        y = jnp.where(drop, -1, batch["label"])
    return x, y


def init_flow(model: TARFlow, model_cfg: ml_collections.ConfigDict, rng: jax.Array) -> Any:
    return model.init(rng, *registry.flow_example_inputs(model_cfg))


def make(config: ml_collections.ConfigDict, model: TARFlow | None = None) -> Objective:
    """NLL per dim on a batch of uint8 images; the trainable tree is the flow's variables."""
    model = model or registry.build_flow(config.model)

    def loss_fn(params, batch, rng, index):
        keys = jax.vmap(lambda k: jax.random.split(k, 2))(example_keys(rng, index))
        x, y = flow_inputs(config.train, model.num_classes, batch, keys, config.get("latent"))
        out = model.apply(params, x, y)
        loss = likelihood.nll_loss(out.z, out.logdets)
        return loss, {"loss": loss, "logdet": jnp.mean(jnp.sum(out.logdets, -1)),
                      "z_sq": jnp.mean(jnp.square(out.z))}

    return Objective(name="flow", init=lambda rng: init_flow(model, config.model, rng), loss=loss_fn,
                     same_run_keys=SAME_RUN_KEYS)

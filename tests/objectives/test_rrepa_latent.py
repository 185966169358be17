"""R-REPA in latent space: DINO's target is the VAE-decoded posterior mean, with the VAE's params
passed to the step as frozen arguments (configs/imagenet256_latent.py:smoke + a tiny random teacher)."""

import jax
import jax.numpy as jnp
import numpy as np
from latent_setup import make_vae, smoke_config

from biflow_jax.objectives import rrepa


def test_latent_rrepa_target_comes_from_the_decoded_mean(tmp_path):
    root = str(tmp_path)
    config = smoke_config(root, "", make_vae(root))
    config.align.update(enabled=True, encoder="tiny", random_init=True, locations=[(2, 1)], projector_hidden=16,
                        resolution=56)
    rrepa.validate_align(config)  # 4 latent channels pass when latent.enabled
    objective = rrepa.make(config)
    assert set(objective.frozen) == {"teacher", "vae"}
    params = objective.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32),
             "image_std": jnp.full((2, 8, 8, 4), 0.1, jnp.float32), "label": jnp.array([0, 1])}
    loss = jax.jit(objective.loss)
    _, real = loss(params, batch, jax.random.key(1), jnp.arange(2), objective.frozen)
    other_vae = jax.tree_util.tree_map(lambda p: p * 0.5, objective.frozen["vae"])
    _, other = loss(params, batch, jax.random.key(1), jnp.arange(2), {**objective.frozen, "vae": other_vae})
    assert np.isfinite(float(real["loss"])) and np.isfinite(float(real["align"]))
    assert float(real["nll"]) == float(other["nll"])  # the flow's input does not go through the decoder
    assert float(real["align"]) != float(other["align"])  # DINO's target does

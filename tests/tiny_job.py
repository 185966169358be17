"""A two-stage job directory in seconds: random (perturbed) F and G saved as the README's job dir would be.

Nothing is trained, so the pictures are noise; tests of the modes check what is written,
where, and what is kept exactly, not how good the images are.
"""

from __future__ import annotations

import os

import jax

from biflow_jax import checkpoint, optim, runs
from biflow_jax.models import registry
from biflow_jax.objectives import biflow


def tiny_config():
    from configs import digits

    config = digits.get_config("quick")
    config.model.update(channels=32, num_blocks=2, layers_per_block=1, head_dim=16)
    config.biflow.model.update(depth=3, width=32, heads=2)
    config.sample.update(num_images=20, batch_size=20)
    return config


def perturbed(params, scale: float = 0.05):
    """Zero-initialised output layers moved off zero, so neither model is the identity (call under jit:
    eager, every leaf would compile its own kernels)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                               for p, k in zip(leaves, keys)])


def make_job_dir(workdir: str):
    """WORKDIR/{config.json, stage.json, forward/, reverse/} holding step-0 checkpoints; returns the config."""
    config = tiny_config()
    forward, reverse_dir = os.path.join(workdir, runs.FORWARD_DIR), os.path.join(workdir, runs.REVERSE_DIR)
    flow = registry.build_flow(config.model)
    inputs = registry.flow_example_inputs(config.model)
    flow_params = jax.jit(lambda key: perturbed(flow.init(key, *inputs)))(jax.random.key(1))
    checkpoint.write_config(workdir, config)
    runs.write_stage_file(workdir, "both", "flow+biflow")
    runs.save_flow(forward, config, flow_params)
    reverse = biflow.build_reverse(config, flow)
    params = jax.jit(lambda key: perturbed(biflow.init_reverse(reverse, flow, key), 0.02))(jax.random.key(2))
    checkpoint.write_config(reverse_dir, config)
    runs.write_stage_file(reverse_dir, "biflow", "biflow", forward)
    mngr = checkpoint.manager(reverse_dir, async_save=False)
    checkpoint.save(mngr, 0, params, params, optim.make_optimizer(config.biflow.optim, 10).init(params), 0)
    mngr.wait_until_finished()
    mngr.close()
    return config

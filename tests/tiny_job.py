"""A two-stage job directory in seconds: random (perturbed) F and G saved as the README's job dir would be.

Nothing is trained, so the pictures are noise; tests of the modes check what is written,
where, and what is kept exactly, not how good the images are.
"""

from __future__ import annotations

import os

import jax
from helpers.configs import tiny_config
from helpers.params import perturbed

from biflow_jax import checkpoint, optim, runs
from biflow_jax.models import registry
from biflow_jax.objectives import biflow


def make_job_dir(workdir: str):
    """WORKDIR/{config.json, stage.json, forward/, reverse/} holding step-0 checkpoints; returns the config."""
    config = tiny_config("both", head_dim=16)
    config.sample.update(num_images=20, batch_size=20)
    forward, reverse_dir = os.path.join(workdir, runs.FORWARD_DIR), os.path.join(workdir, runs.REVERSE_DIR)
    flow = registry.build_flow(config.model)
    inputs = registry.flow_example_inputs(config.model)
    flow_params = perturbed(jax.jit(flow.init)(jax.random.key(1), *inputs), 0.05)
    checkpoint.write_config(workdir, config)
    runs.write_stage_file(workdir, "both", "flow+biflow")
    runs.save_flow(forward, config, flow_params)
    reverse = biflow.build_reverse(config, flow)
    params = perturbed(jax.jit(lambda key: biflow.init_reverse(reverse, flow, key))(jax.random.key(2)), 0.02, seed=8)
    checkpoint.write_config(reverse_dir, config)
    runs.write_stage_file(reverse_dir, "biflow", "biflow", forward)
    mngr = checkpoint.manager(reverse_dir, async_save=False)
    checkpoint.save(mngr, 0, params, params, optim.make_optimizer(config.biflow.optim, 10).init(params), 0)
    mngr.wait_until_finished()
    mngr.close()
    return config

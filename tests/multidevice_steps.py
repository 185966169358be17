"""Run 3 train steps on an 8-device mesh and on a 1-device mesh; print max differences as JSON.

Started by tests/test_train.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must precede importing jax).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for configs/

import jax
import numpy as np

from biflow_jax import optim, sharding, trainer
from biflow_jax.data import input_pipeline
from biflow_jax.objectives import flow
from configs import digits


def run(devices, config, batches):
    mesh = sharding.make_mesh(devices)
    optimizer = optim.make_optimizer(config.optim, config.train.steps)
    objective = flow.make(config)
    state = trainer.init_state(objective, optimizer, config.train.seed, config.parallel, mesh)
    step = trainer.make_train_step(objective.loss, optimizer, config.train, config.parallel, mesh)
    state = step.to_backend(state)  # the backend's layout (pmap: one replica per device)
    losses = []
    for batch in batches:
        state, metrics = step(state, step.put_batch(batch))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(step.from_backend(state.params))


def main():
    assert jax.device_count() == 8, jax.devices()
    config = digits.get_config("quick")
    config.train.batch_size = 32
    config.model.update(num_blocks=2, layers_per_block=1, channels=32, head_dim=32)  # compile-bound: a small flow
    config.parallel.backend = sys.argv[1] if len(sys.argv) > 1 else "jit"
    it = input_pipeline.train_batches(config.data, config.train.batch_size, config.train.seed)
    batches = [next(it) for _ in range(3)]
    loss8, params8 = run(jax.devices(), config, batches)
    loss1, params1 = run(jax.devices()[:1], config, batches)
    diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))),
                                                             params8, params1))
    scale = max(float(np.max(np.abs(p))) for p in jax.tree_util.tree_leaves(params1))
    print(json.dumps({"loss8": loss8.tolist(), "loss1": loss1.tolist(), "max_param_diff": max(diffs),
                      "param_scale": scale, "params_moved": float(np.max(np.abs(
                          jax.tree_util.tree_leaves(params1)[0])))}))


if __name__ == "__main__":
    main()

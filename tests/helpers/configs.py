"""The digits configs tests train and build: short runs, and models small enough to compile in seconds."""

from __future__ import annotations

import ml_collections


def quick_config(stage: str = "flow", steps: int = 100) -> ml_collections.ConfigDict:
    """configs/digits.py:quick with `steps` for each stage (checkpoint at half, eval at the end)."""
    from configs import digits

    config = digits.get_config("quick")
    config.stage = stage
    for train in (config.train, config.biflow.train):
        train.update(steps=steps, checkpoint_every=max(steps // 2, 1), eval_every=steps, log_every=max(steps // 2, 1),
                     keep_checkpoints=3)
    config.evals.bpd.every = steps
    config.biflow.evals.reconstruction.every = steps
    return config


def tiny_config(stage: str = "flow", steps: int | None = None, channels: int = 32,
                head_dim: int | None = 32) -> ml_collections.ConfigDict:
    """digits:quick (`quick_config(stage, steps)` when `steps` is given) with a 2-block, 1-layer flow
    `channels` wide and a G 3 layers deep and 32 wide; head_dim None keeps the config's."""
    from configs import digits

    if steps is None:
        config = digits.get_config("quick")
        config.stage = stage
    else:
        config = quick_config(stage, steps)
    config.model.update(num_blocks=2, layers_per_block=1, channels=channels)
    if head_dim is not None:
        config.model.head_dim = head_dim
    config.biflow.model.update(depth=3, width=32, heads=2)
    return config

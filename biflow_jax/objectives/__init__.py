"""Objectives: what a training stage optimises.

An Objective owns its parameter layout: `init` makes the trainable tree, `flow_params`
finds the forward flow inside it (for evaluation and sampling), `frozen` holds the
untrained networks the loss reads (a DINOv2 teacher, stage 2's forward flow), which reach
the jitted step as arguments rather than as constants compiled into it.

- `flow`   stage 1, maximum likelihood of TARFlow (arXiv:2412.06329)
- `rrepa`  stage 1 with R-REPA's reverse alignment to DINOv2 (arXiv:2511.22345)
- `biflow` stage 2, BiFlow's learned reverse model G (arXiv:2512.10953)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

STAGES = ("flow", "biflow")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the trainer optimises.

    loss(params, batch, rng, index[, frozen]) -> (scalar, metrics) on this device's slice of the
    batch; `index` holds the examples' global indices (draw per-example noise from them).
    same_run_keys: config keys that must match for a workdir's checkpoints to be resumed.
    """

    name: str
    init: Callable[[Any], Any]
    loss: Callable
    flow_params: Callable[[Any], Any] = lambda params: params
    frozen: Any = None
    same_run_keys: tuple[str, ...] = ()


def stage_objective_name(config: Any, stage: str) -> str:
    """Which objective a stage of this config trains: 'flow', 'rrepa' or 'biflow'."""
    if stage == "biflow":
        return "biflow"
    align = config.get("align", None)
    return "rrepa" if align is not None and align.get("enabled", False) else "flow"


def validate(config: Any, stage: str) -> None:
    """Every check a stage's objective makes of the config, before anything runs or is written."""
    from biflow_jax.objectives import biflow, flow, rrepa

    name = stage_objective_name(config, stage)
    {"flow": flow.validate, "rrepa": rrepa.validate, "biflow": biflow.validate}[name](config)


def flow_params_of(objective_name: str, trainable: Any) -> Any:
    """The forward flow's variables inside a stage-1 objective's trainable tree (its layout)."""
    if objective_name == "rrepa":
        return trainable["flow"]  # {'flow': flow variables, 'projectors': {...}}
    if objective_name == "flow":
        return trainable
    raise ValueError(f"objective {objective_name!r} trains no forward flow")

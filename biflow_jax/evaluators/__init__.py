"""Evaluators: a run's params -> figures, chosen by a stage's `evals` config section.

`evals` maps an evaluator's name to its settings, `every` (steps; 0 = only at the end of the
stage) plus the evaluator's own keys. Each evaluator is a callable on the stage's EMA
trainable params with `.name` and `.every`; the trainer calls the due ones and logs their
figures under `eval/`. Stage 1 (the flow) and stage 2 (BiFlow's G) offer different ones.
"""

from __future__ import annotations

from typing import Any

from biflow_jax.errors import ConfigError

FLOW_EVALUATORS = ("bpd",)
BIFLOW_EVALUATORS = ("reconstruction", "digits_quality")


def _check_names(evals: Any, known: tuple[str, ...], key: str) -> None:
    for name in evals:
        if name not in known:
            raise ConfigError(f"{key}.{name} is not an evaluator of this stage; choose from {list(known)}")


def validate(config: Any, stage: str) -> None:
    if stage == "biflow":
        _check_names(config.biflow.get("evals", {}), BIFLOW_EVALUATORS, "biflow.evals")
    else:
        _check_names(config.get("evals", {}), FLOW_EVALUATORS, "evals")


def for_flow_stage(config: Any, model: Any, flow_params: Any, mesh: Any) -> list[Any]:
    """Stage 1's evaluators. flow_params(trainable) -> the flow's variables (the objective's layout)."""
    from biflow_jax.evaluators import bpd

    evals = config.get("evals", {})
    _check_names(evals, FLOW_EVALUATORS, "evals")
    out = []
    if "bpd" in evals:
        out.append(bpd.BitsPerDim(config, model, flow_params, mesh, int(evals.bpd.get("every", 0))))
    return out


def for_biflow_stage(config: Any, flow_run: Any, reverse: Any, mesh: Any) -> list[Any]:
    """Stage 2's evaluators, on G's params with the frozen flow of `flow_run`."""
    evals = config.biflow.get("evals", {})
    _check_names(evals, BIFLOW_EVALUATORS, "biflow.evals")
    out = []
    if "reconstruction" in evals:
        from biflow_jax.evaluators import reconstruction

        out.append(reconstruction.Reconstruction(config, flow_run, reverse, mesh,
                                                 int(evals.reconstruction.get("every", 0))))
    if "digits_quality" in evals:
        from biflow_jax.evaluators import digits_quality

        settings = evals.digits_quality
        out.append(digits_quality.SampleQuality(config, flow_run, reverse, int(settings.get("every", 0)),
                                                per_class=int(settings.get("per_class", 30))))
    return out

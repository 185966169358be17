"""`--mode=train`: train the stages a config asks for, then show what they generate.

config.stage = 'flow'   stage 1 in WORKDIR (TARFlow NLL, or R-REPA with align.enabled);
               'biflow' stage 2 in WORKDIR against the stage-1 run biflow.flow_init;
               'both'   WORKDIR/forward then WORKDIR/reverse (the two-stage job), then the
                        exact inverse and BiFlow side by side on the same noise.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from biflow_jax import checkpoint, evaluators, latent_space, objectives, runs, sharding, trainer, workdir_lock
from biflow_jax.config_checks import validate_parallel
from biflow_jax.console import say
from biflow_jax.data import input_pipeline
from biflow_jax.errors import ConfigError, require
from biflow_jax.models import registry
from biflow_jax.objectives import biflow, flow, rrepa

STAGES = ("flow", "biflow", "both")


def validate(config: ml_collections.ConfigDict) -> None:
    """Every check of every stage this config runs, before anything is written."""
    require(config.stage in STAGES, f"stage={config.stage!r} must be one of {STAGES}")
    from biflow_jax.modes import sample  # the grids sampled after each stage: checked before training

    sample.check_settings(sample.sample_settings(config))
    latent_space.validate(config)  # a latent run's VAE directory, data and evaluators
    validate_parallel(config)  # one device layout for every stage
    if config.stage in ("flow", "both"):
        objectives.validate(config, "flow")
        evaluators.validate(config, "flow")
    if config.stage in ("biflow", "both"):
        objectives.validate(config, "biflow")
        evaluators.validate(config, "biflow")
        if config.stage == "biflow":
            require(bool(config.biflow.flow_init),
                    "stage 2 needs config.biflow.flow_init: the workdir of a finished stage-1 run")


def check_batch_sizes(config: ml_collections.ConfigDict, info: dict[str, Any]) -> None:
    """Each stage's batch fits its training split (checked before the workdir is written)."""
    examples = info["num_examples"].get(config.data.train_split)
    for stage in ("flow", "biflow"):
        if config.stage not in (stage, "both"):
            continue
        train, _ = trainer.loop_sections(config, stage)
        key = "biflow.train.batch_size" if stage == "biflow" else "train.batch_size"
        require(train.batch_size > 0, f"{key}={train.batch_size} must be positive")
        if examples is not None:
            require(train.batch_size <= examples, f"{key}={train.batch_size} is larger than the training split "
                    f"{config.data.train_split!r} ({examples} examples)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run the config's stages in `workdir`; returns each stage's final figures."""
    checkpoint.check_path(workdir)
    validate(config)
    info = input_pipeline.dataset_info(config.data)  # a missing dataset fails here, before the workdir is touched
    check_batch_sizes(config, info)
    with workdir_lock.hold(workdir):  # one writer per workdir (each stage's loop also locks its own dir)
        return train_stages(config, workdir)


def train_stages(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    if config.stage == "flow":
        return {"flow": train_flow(config, workdir)}
    if config.stage == "biflow":
        return {"biflow": train_biflow(config, workdir, config.biflow.flow_init)}
    forward, reverse = os.path.join(workdir, runs.FORWARD_DIR), os.path.join(workdir, runs.REVERSE_DIR)
    if config.biflow.flow_init:
        raise ConfigError("stage='both' trains its own flow in WORKDIR/forward; biflow.flow_init must be empty")
    checkpoint.write_config(workdir, config)
    runs.write_stage_file(workdir, "both", "flow+biflow")
    results = {"flow": train_flow(config, forward)}
    results["biflow"] = train_biflow(config, reverse, forward)
    return results


def train_flow(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Stage 1, then its test bits/dim next to a diagonal-Gaussian baseline and a sample grid."""
    from biflow_jax.evaluators import bpd
    from biflow_jax.modes import sample

    mesh = sharding.make_mesh()
    model = registry.build_flow(config.model)
    objective = (rrepa if objectives.stage_objective_name(config, "flow") == "rrepa" else flow).make(config, model)
    evals = evaluators.for_flow_stage(config, model, objective.flow_params, mesh)
    results = trainer.run(objective, evals, config, workdir, "flow", mesh)
    if "test_bpd" in results or "test_bpd_uniform_dequantised" in results:
        value = results.get("test_bpd", results.get("test_bpd_uniform_dequantised"))
        baseline = bpd.gaussian_baseline_bpd(config, mesh)
        say(f"test bits/dim (uniform dequantisation): flow (EMA) {value:.4f} | diagonal-Gaussian baseline "
            f"{baseline:.4f}")
    if single_process():
        out = sample.run_sample(workdir, sampler="exact", out_dir=os.path.join(workdir, "samples"))
        say(f"exact-inverse samples: {out['samples_png']}")
    return results


def single_process() -> bool:
    """The grids after a stage restore checkpoints, a collective in Orbax: in a multi-process run one
    process cannot do it alone, so there the grids are left to `--mode=sample` (said on the console)."""
    if jax.process_count() == 1:
        return True
    say("multi-process run: no sample grid here; run --mode=sample on this workdir from one process")
    return False


def train_biflow(config: ml_collections.ConfigDict, workdir: str, flow_workdir: str) -> dict[str, float]:
    """Stage 2 against the frozen flow of `flow_workdir`, then exact inverse vs BiFlow side by side."""
    from biflow_jax.modes import compare

    try:
        flow_run = runs.load_flow(flow_workdir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the stage-1 flow named by biflow.flow_init cannot be loaded: {e}") from None
    mesh = sharding.make_mesh()
    objective = biflow.make(config, flow_run)
    reverse = biflow.build_reverse(config, flow_run.model)
    evals = evaluators.for_biflow_stage(config, flow_run, reverse, mesh)
    results = trainer.run(objective, evals, config, workdir, "biflow", mesh, flow_workdir=flow_run.workdir)
    if single_process():
        figures = compare.compare(workdir)
        say(f"exact inverse vs BiFlow on the same noise: {figures['grid']}")
        for line in compare.speed_lines(figures, jax.default_backend()):
            say(line)
        if "exact_frechet" in figures:
            say("digits quality (classifier features; lower Frechet and higher label accuracy are better): "
                f"exact inverse FD {figures['exact_frechet']:.3f} acc {figures['exact_label_accuracy']:.3f} | "
                f"BiFlow (w={figures['biflow_w']:g}) FD {figures['biflow_frechet']:.3f} "
                f"acc {figures['biflow_label_accuracy']:.3f} | BiFlow (w=0) FD "
                f"{figures['biflow_w0_frechet']:.3f} acc {figures['biflow_w0_label_accuracy']:.3f}")
    jax.effects_barrier()
    return results

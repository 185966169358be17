"""Evaluators: a run's params -> figures, chosen by a stage's `evals` config section.

`evals` maps an evaluator's name to its settings, `every` (steps; 0 = only at the end of the
stage) plus the evaluator's own keys. `fid` (configs/common.py's `fid()`) also holds the settings of
`--mode=eval`; its `every=-1` keeps it out of training. Each evaluator is a callable on the stage's EMA
trainable params with `.name` and `.every`; the trainer calls the due ones and logs their
figures under `eval/`. Stage 1 (the flow) and stage 2 (BiFlow's G) offer different ones.
"""

from __future__ import annotations

from typing import Any

from biflow_jax.errors import ConfigError

FLOW_EVALUATORS = ("bpd", "fid")
BIFLOW_EVALUATORS = ("reconstruction", "digits_quality", "fid")


def _check_names(evals: Any, known: tuple[str, ...], key: str) -> None:
    for name in evals:
        if name not in known:
            raise ConfigError(f"{key}.{name} is not an evaluator of this stage; choose from {list(known)}")


def validate(config: Any, stage: str) -> None:
    if stage == "biflow":
        _check_names(config.biflow.get("evals", {}), BIFLOW_EVALUATORS, "biflow.evals")
    else:
        _check_names(config.get("evals", {}), FLOW_EVALUATORS, "evals")
    fid_settings = _fid_in_training(config, stage)
    if fid_settings is not None:
        from biflow_jax.evaluators import sample_fid

        sample_fid.check_settings(fid_settings)


def _fid_in_training(config: Any, stage: str) -> dict[str, Any] | None:
    """The stage's fid settings when it runs during training (every >= 0), else None (--mode=eval only)."""
    evals = config.biflow.get("evals", {}) if stage == "biflow" else config.get("evals", {})
    if "fid" not in evals:
        return None
    from biflow_jax.evaluators import sample_fid

    settings = sample_fid.fid_settings(config, stage)
    return settings if int(settings["every"]) >= 0 else None


def for_flow_stage(config: Any, model: Any, flow_params: Any, mesh: Any) -> list[Any]:
    """Stage 1's evaluators. flow_params(trainable) -> the flow's variables (the objective's layout)."""
    from biflow_jax.evaluators import bpd

    evals = config.get("evals", {})
    _check_names(evals, FLOW_EVALUATORS, "evals")
    out = []
    if "bpd" in evals:
        out.append(bpd.BitsPerDim(config, model, flow_params, mesh, int(evals.bpd.get("every", 0))))
    settings = _fid_in_training(config, "flow")
    if settings is not None:
        from biflow_jax import latent_space
        from biflow_jax.evaluators import sample_fid

        decoder = latent_space.load_decoder(config)  # latent runs: samples decoded through the VAE (its params
        params_of = flow_params if decoder is None else (lambda p: (flow_params(p), decoder.params))  # as args)
        sampler = sample_fid.exact_sampler(model, config, config, settings, decoder)
        out.append(sample_fid.SampleFID(settings, sampler, mesh, params_of))
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
    fid_settings = _fid_in_training(config, "biflow")
    if fid_settings is not None:
        from biflow_jax import latent_space
        from biflow_jax.evaluators import sample_fid

        decoder = latent_space.load_decoder(config)
        sampler = sample_fid.biflow_sampler(reverse, flow_run.model, config, fid_settings, decoder)
        out.append(sample_fid.SampleFID(fid_settings, sampler, mesh, (lambda p: p) if decoder is None
                                        else (lambda p: (p, decoder.params))))
    return out

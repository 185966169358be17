"""One source for every default: a mode or evaluator reading a config without a section (a run saved
before it existed) uses configs/common.py's values, the same ones a fresh config holds."""

from __future__ import annotations

import ml_collections
from helpers.configs import quick_config

from biflow_jax import architecture, config_files
from biflow_jax.evaluators import sample_fid
from biflow_jax.models import registry
from biflow_jax.modes import sample
from configs import common


def without(config: ml_collections.ConfigDict, *keys: str) -> ml_collections.ConfigDict:
    raw = config.to_dict()
    for key in keys:
        raw.pop(key)
    return ml_collections.ConfigDict(raw)


def test_modes_and_the_fid_evaluator_take_the_configs_defaults():
    config = quick_config("flow", 10)
    config.train.update(noise="gaussian", noise_std=0.3)
    old_run = without(config, "sample", "evals")
    assert sample.sample_settings(old_run) == common.sample().to_dict() == sample.sample_settings(config)
    assert sample.sample_settings(None)["denoise"] is common.sample().denoise is False
    fid_settings = sample_fid.fid_settings(old_run, "flow")
    assert {k: v for k, v in fid_settings.items() if k != "section"} == common.fid().to_dict()
    # The two exact-inverse samplers (sample mode, FID evaluator) agree on denoising and solver.
    sigma = sample.denoise_sigma(old_run, sample.sample_settings(old_run))
    flow = registry.build_flow(config.model)
    description = sample_fid.exact_sampler(flow, old_run, old_run, fid_settings).description
    assert sigma == 0.0 and f"denoise sigma {sigma:g})" in description
    assert f"({common.sample().solver} solver" in description
    old_run.sample = {"denoise": True}  # a partial section: the rest from the defaults
    assert sample.denoise_sigma(old_run, sample.sample_settings(old_run)) == 0.3
    assert "denoise sigma 0.3)" in sample_fid.exact_sampler(flow, old_run, old_run, fid_settings).description
    # No second table of defaults is left in the modules that read these sections.
    for module in (sample, sample_fid):
        assert not [name for name in vars(module) if name.endswith("_DEFAULTS")], module.__name__
    assert config_files.defaults("flow_train")["noise"] == common.flow_train().noise


def test_the_models_option_tables_equal_the_configs_defaults():
    """The fallbacks for keys an older run lacks (`architecture.FLOW_OPTION_DEFAULTS`, read by the flow,
    the export layout and runs; model code may not read configs/) are the values
    configs/common.flow_model() gives, so they cannot drift apart."""
    model = common.flow_model().to_dict()
    table = architecture.FLOW_OPTION_DEFAULTS
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()} == {
        k: tuple(model[k]) if isinstance(model[k], (list, tuple)) else model[k] for k in table}

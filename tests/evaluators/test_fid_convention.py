"""An ADM reference batch scored in a non-ADM Inception convention stops with one line (exit 2 on the
CLI) unless evals.fid.allow_convention_mismatch says the user knows; our own references carry
their convention (ref_stats' `biflow_meta`) and are checked against it.

No Inception network runs: the check reads the file and the extractor's settings only.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from helpers.configs import quick_config

from biflow_jax import config_files
from biflow_jax.errors import ConfigError
from biflow_jax.evaluators import fid, sample_fid


def extractor(convention: str, random: bool = False, size: int = 299):
    """The settings check_feature_space reads from an InceptionExtractor."""
    return types.SimpleNamespace(random=random, size=size, convention=convention,
                                 describe=lambda: f"weights; {convention} resize to {size} px")


def reference(path, meta: dict | None) -> str:
    extra = {} if meta is None else {sample_fid.META_KEY: np.asarray(json.dumps(meta))}
    fid.write_reference_batch(path, np.zeros(2), np.eye(2), np.zeros(1), np.eye(1), extra=extra)
    return str(path)


def settings(path: str, **fid_section) -> dict:
    config = quick_config("flow", 10)
    config.evals.fid.update(reference=path, **fid_section)
    return sample_fid.fid_settings(config, "flow")


def test_adm_reference_with_pytorch_fid_convention_stops_unless_allowed(tmp_path, monkeypatch, capsys):
    adm = reference(tmp_path / "VIRTUAL_imagenet64_labeled.npz", None)  # ADM's files have no biflow_meta
    assert sample_fid.check_feature_space(settings(adm), extractor("adm")) == adm
    with pytest.raises(ConfigError, match=r"ADM reference batch \(convention 'adm'\) but evals.fid.convention="
                                          r"'pytorch_fid'.*allow_convention_mismatch=True"):
        sample_fid.check_feature_space(settings(adm, convention="pytorch_fid"), extractor("pytorch_fid"))
    allowed = settings(adm, convention="pytorch_fid", allow_convention_mismatch=True)
    assert sample_fid.check_feature_space(allowed, extractor("pytorch_fid")) == adm
    assert config_files.defaults("fid")["allow_convention_mismatch"] is False
    # On the command line: one line, exit 2.
    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(SystemExit) as stop:
        config_files.run_cli(lambda argv: sample_fid.check_feature_space(settings(adm, convention="pytorch_fid"),
                                                                         extractor("pytorch_fid")))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "pytorch_fid" in err[0]


def test_our_references_are_checked_against_the_convention_they_record(tmp_path):
    ours = reference(tmp_path / "ref.npz", {"inception": "random", "convention": "adm", "inception_size": 75,
                                           "resize": "adm_center_crop"})
    assert sample_fid.check_feature_space(settings(ours), extractor("adm", True, 75)) == ours
    with pytest.raises(ConfigError, match="convention 'adm' vs 'pytorch_fid'"):
        sample_fid.check_feature_space(settings(ours), extractor("pytorch_fid", True, 75))
    allowed = settings(ours, allow_convention_mismatch=True)
    assert sample_fid.check_feature_space(allowed, extractor("pytorch_fid", True, 75)) == ours
    with pytest.raises(ConfigError, match="inception_size 75 vs 80"):  # the flag lets the convention differ only
        sample_fid.check_feature_space(allowed, extractor("pytorch_fid", True, 80))

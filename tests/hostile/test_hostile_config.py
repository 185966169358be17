"""Hostile configs: values that overflow or make no sense get one line naming the key at parse or validation
time, and a config file imports only itself and the repository's configs/ package."""

import importlib.util
import os
import sys

import pytest
from helpers.configs import quick_config
from helpers.paths import REPO

from biflow_jax import config_checks, config_files
from biflow_jax.errors import ConfigError


def test_negative_warmup_says_it_must_not_be_negative():
    """Case: optim.warmup_steps=-5 said it 'must be smaller than train.steps'."""
    config = config_files.apply_overrides(quick_config("flow", 40), ["optim.warmup_steps=-5"])
    with pytest.raises(ConfigError, match=r"^optim.warmup_steps=-5 must be zero or positive$"):
        config_checks.validate_loop(config.train, config.optim, "train")


@pytest.mark.parametrize("text", ["1e999", "-1e999", str(10**400)], ids=["1e999", "-1e999", "10**400"])
def test_a_value_that_overflows_to_inf_is_refused_at_parse_time(text):
    """Case: lr=1e999 was accepted and failed later as a diverged loss."""
    with pytest.raises(ConfigError, match=r"config key 'optim.lr' takes a finite number, got .* \(it reads as -?inf\)"):
        config_files.apply_overrides(quick_config("flow", 40), [f"optim.lr={text}"])
    assert config_files.apply_overrides(quick_config("flow", 40), ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_a_config_file_does_not_put_its_folder_on_sys_path(tmp_path):
    """Case: config_files put the config file's parent folder first on sys.path, so a file such as orbax.py
    beside a downloaded configs/ folder was imported and run."""
    downloaded = tmp_path / "download" / "configs"
    downloaded.mkdir(parents=True)
    with open(os.path.join(REPO, "configs", "digits.py")) as f:
        (downloaded / "mine.py").write_text(f.read())
    for folder in (downloaded, downloaded.parent):
        (folder / "orbax.py").write_text("raise SystemExit('a file beside the config was imported')\n")
        (folder / "hostile_beside.py").write_text("raise SystemExit('a file beside the config was imported')\n")
    before = list(sys.path)
    config = config_files.load(f"{downloaded / 'mine.py'}:quick")  # `from configs import common` still works
    assert config.train.steps > 0
    assert sys.path == before
    assert importlib.util.find_spec("hostile_beside") is None
    spec = importlib.util.find_spec("orbax")
    assert not any(str(tmp_path) in str(p) for p in [spec.origin, *(spec.submodule_search_locations or [])])
    assert os.path.samefile(os.path.dirname(sys.modules["configs"].__file__), os.path.join(REPO, "configs"))

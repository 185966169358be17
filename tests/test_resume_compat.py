"""Resuming a run saved before a config option existed: off-valued new options are no difference."""

import pytest
from helpers.configs import quick_config

from biflow_jax import checkpoint, trainer


def test_new_option_at_its_off_value_resumes_but_a_real_change_is_refused(tmp_path):
    saved = quick_config("flow", 10)
    with saved.unlocked():
        for key in ("scan_layers", "remat", "rope", "norm", "qk_norm", "mlp", "block_layers"):
            del saved.model[key]  # as written before the options existed
    checkpoint.write_config(str(tmp_path), saved)
    current = quick_config("flow", 10)
    trainer.check_same_run(str(tmp_path), current, ("model", "data.name"))  # every option at its default: fine
    # The saved run is read with the defaults filled in (the model it was trained as), so a change names both.
    current.model.remat = "full"
    with pytest.raises(ValueError, match=r"model.remat: 'none' -> 'full'"):
        trainer.check_same_run(str(tmp_path), current, ("model", "data.name"))
    current.model.remat = "none"
    current.model.mlp = "swiglu"
    with pytest.raises(ValueError, match=r"model.mlp: 'gelu' -> 'swiglu'"):
        trainer.check_same_run(str(tmp_path), current, ("model", "data.name"))
    current.model.mlp = "gelu"
    current.model.channels = 32
    with pytest.raises(ValueError, match=r"model.channels: 64 -> 32"):
        trainer.check_same_run(str(tmp_path), current, ("model", "data.name"))

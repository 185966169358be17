"""biflow_jax.architecture: dependency-free, and its arithmetic is the models' (the widths and splits
the old per-module copies gave)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from biflow_jax import architecture


def test_imports_neither_jax_nor_torch():
    """The numpy-only layouts and the PyTorch port read it: it must not pull JAX or torch in."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('a', sys.argv[1]); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "print(sorted(m for m in ('jax', 'torch', 'numpy', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, architecture.__file__], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_swiglu_hidden_is_the_flow_and_g_rule():
    # The flow's integer form 8 * ceil(2 e C / 24) (every even width) and G's float form.
    for c in range(2, 2050, 2):
        for e in (1, 2, 3, 4):
            assert architecture.swiglu_hidden(c, e) == 8 * -(-2 * e * c // 24)
    assert architecture.swiglu_hidden(768, 4.0) == 2048 and architecture.swiglu_hidden(1024, 4.0) == 2736
    assert architecture.mlp_hidden("gelu", 64, 4) == architecture.mlp_hidden("geglu_starflow", 64, 4) == 256


def test_stage_split_and_flow_options():
    assert architecture.stage_sizes(12, 4) == (3, 3, 2, 2, 2)
    assert architecture.stage_sizes(4, 2, (1, 1, 2)) == (1, 1, 2)
    with pytest.raises(ValueError, match="every stage needs a layer"):
        architecture.stage_sizes(2, 2)
    cfg = dict(num_blocks=2, head_dim=16, layers_per_block=3)
    assert architecture.flow_options(cfg) == {**architecture.FLOW_OPTION_DEFAULTS, "block_layers": ()}
    assert architecture.flow_layer_counts({**cfg, "block_layers": [1, 4]}) == (1, 4)
    assert architecture.options_in_use({**cfg, "mlp": "swiglu", "block_layers": [1, 4]}) == [
        "swiglu", "block_layers=[1, 4]"]
    with pytest.raises(ValueError, match="model.norm"):
        architecture.flow_options({**cfg, "norm": "batchnorm"})
    with pytest.raises(ValueError, match="model.dtype"):
        architecture.check_dtype("float16", "model.dtype")

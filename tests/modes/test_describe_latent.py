"""configs/imagenet256_latent.py sizes: the paper's parameter counts (BiFlow, arXiv:2512.10953)."""

import pytest
from helpers.paths import REPO

from biflow_jax import config_files
from biflow_jax.modes import describe


@pytest.mark.parametrize("arg,flow_m,g_m", [("b2", 120, 133), ("xl2", 690, None)])
def test_latent_configs_match_the_paper_sizes(arg, flow_m, g_m):
    config = config_files.load(f"{REPO}/configs/imagenet256_latent.py:{arg}").copy_and_resolve_references()
    config.stage = "both"
    flow, reverse = describe.describe(config)["stages"]
    assert flow["tokens"] == reverse["tokens"] == 256 and flow["token_dim"] == 16  # 32x32x4 latents, patch 2
    assert abs(flow["params"] / 1e6 - flow_m) < 0.1 * flow_m, flow["params"]
    if g_m:
        assert abs(reverse["params"] / 1e6 - g_m) < 0.1 * g_m, reverse["params"]

"""`--mode=describe`: abstract models for every config; G's classes always equal the flow's."""

import json
import subprocess
import sys

import pytest
from conftest import REPO
from test_configs import CONFIG_FILES, VARIANTS

from biflow_jax import config_files
from biflow_jax.modes import describe

CASES = [(name, arg) for name in CONFIG_FILES for arg in VARIANTS.get(name, [""])]


@pytest.mark.parametrize("name,arg", CASES)
def test_describe_every_config_and_variant(name, arg):
    config = config_files.load(f"{REPO}/configs/{name}" + (f":{arg}" if arg else ""))
    result = describe.describe(_both(config))
    flow, reverse = result["stages"]
    assert flow["name"] == "flow" and reverse["name"] == "biflow"
    assert reverse["classes"] == flow["classes"] == config.model.num_classes
    assert reverse["tokens"] == flow["tokens"] and flow["params"] > 0 and reverse["params"] > 0


def _both(config):
    config = config.copy_and_resolve_references()
    config.stage = "both"
    return config


def test_imagenet64_p2_reports_1000_classes_for_both_stages_on_the_command_line():
    out = subprocess.run([sys.executable, "-m", "biflow_jax.main", "--mode=describe",
                          "--config=configs/imagenet64.py:p2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [s["name"] for s in result["stages"]] == ["flow", "biflow"]
    assert [s["classes"] for s in result["stages"]] == [1000, 1000]
    assert all(s["tokens"] == 1024 for s in result["stages"])  # 64x64, patch 2
    assert result["stages"][0]["flops_per_image"] > 1e9

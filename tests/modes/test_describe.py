"""`--mode=describe`: abstract models for every config; G's classes always equal the flow's."""

import json
import subprocess
import sys

import pytest
from helpers.paths import REPO
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
    # The conditional flow trains on labelled ImageNet (TFDS imagenet2012, validation as the test split).
    assert result["data"] == {"name": "imagenet2012", "train_split": "train", "test_split": "validation",
                              "labelled": True, "num_classes": 1000, "image_size": 64}
    assert ("data: imagenet2012 (train split 'train', test split 'validation'), 64 px, labelled, 1000 classes"
            in out.stdout.splitlines())


def test_unconditional_imagenet64_describes_an_unlabelled_dataset_and_no_classes():
    config = config_files.load(f"{REPO}/configs/imagenet64.py:uncond")
    data = describe.describe_data(config)
    assert data["name"] == "downsampled_imagenet/64x64" and not data["labelled"] and data["num_classes"] == 0
    assert describe.data_line(data).endswith("64 px, unlabelled (unconditional)")
    assert config.model.num_classes == 0 and config.train.label_drop == 0 and not config.biflow.cfg_training
    assert config.sample.guidance == 0 and config.evals.fid.guidance == 0 and config.evals.fid.reference_name == ""

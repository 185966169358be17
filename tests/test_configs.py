"""Configs are data: every file and variant parses without TensorFlow, Orbax or our model code."""

import glob
import importlib
import json
import os
import subprocess
import sys

from helpers.paths import REPO

CONFIG_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                      if not os.path.basename(p).startswith(("_", "common")))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
# Each config module's own VARIANTS tuple (what the config walk, tests/test_config_walk.py, walks too).
VARIANTS = {name: list(importlib.import_module(f"configs.{name[:-3]}").VARIANTS) for name in CONFIG_FILES}

PROBE = """
import importlib, json, sys
sys.path.insert(0, {repo!r})
loaded = []
for name, variants in {variants!r}.items():
    module = importlib.import_module("configs." + name[:-3])
    for arg in variants:
        config = module.get_config(arg)
        loaded.append([name, arg, config.stage])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "orbax", "flax", "jax")
               or m.startswith("biflow_jax"))
print(json.dumps({{"loaded": loaded, "heavy": heavy}}))
"""


def test_every_config_and_variant_parses_without_heavy_imports():
    variants = {name: VARIANTS.get(name, [""]) for name in CONFIG_FILES}
    assert {"digits.py", "imagenet64.py", "imagenet256_latent.py"} <= set(CONFIG_FILES), CONFIG_FILES
    assert VARIANTS["imagenet64.py"] == ["p2", "p4", "uncond"] == VARIANTS["imagenet64_rrepa.py"]
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=REPO, variants=variants)], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["loaded"]) == sum(len(v) for v in variants.values())
    assert result["heavy"] == [], result["heavy"]  # no TensorFlow, Orbax, JAX, Flax or biflow_jax


def test_config_files_import_nothing_from_biflow_jax():
    for name in CONFIG_FILES + ["common.py"]:
        with open(os.path.join(REPO, "configs", name)) as f:
            source = f.read()
        assert "biflow_jax" not in source.replace("no biflow_jax", ""), name
        assert "tensorflow" not in source, name


def test_paper_configs_train_stage_1_by_default_with_a_real_stage_2():
    sys.path.insert(0, REPO)
    from configs import afhq256, imagenet64, imagenet64_rrepa

    for config in (imagenet64.get_config("p2"), imagenet64.get_config("p4"), imagenet64_rrepa.get_config("p2"),
                   afhq256.get_config()):
        assert config.stage == "flow"
        assert config.biflow.model.variant == "B/2"
        assert config.biflow.train.steps > 0 and config.biflow.train.batch_size == 256
        assert "num_classes" not in config.biflow.model  # G's classes are the flow's

"""The optional PyTorch side: rebuild models exported by `python -m biflow_jax.export`.

Needs the `torch` extra (`pip install -e .[torch]`); nothing else in biflow_jax imports
this package, so JAX-only installs never touch torch.

An export directory holds, per part, `{part}.safetensors` + `{part}_config.json`.
`PARTS` says which PyTorch class rebuilds each part; the class must offer
`from_config(config: dict) -> nn.Module` and a state_dict whose keys are the exported ones:
the forward flow (`tarflow.Model`) and, for an exported stage-2 run, BiFlow's reverse
model G (`reverse.ReverseModel`). Neither clips its output: pixel images are clamped to
[-1, 1] by the caller (the exact inverse of a flow trained on dequantised data can
overshoot slightly), latent-space models return VAE latents.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file

from biflow_jax.torch.tarflow import Model

# part name -> "module:class" of its PyTorch port (imported only if that part was exported).
PARTS = {
    "forward": "biflow_jax.torch.tarflow:Model",
    "reverse": "biflow_jax.torch.reverse:ReverseModel",
}


def _port(part: str) -> Any:
    module_name, class_name = PARTS[part].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise NotImplementedError(f"the export has a '{part}' model but there is no PyTorch port of it "
                                  f"yet ({module_name} is missing)") from err
    return getattr(module, class_name)


def load(out_dir: str, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Every exported part as a ready model in eval mode, plus its config.

    Returns e.g. {'forward': Model, 'forward_config': dict} and, when the export has them,
    'reverse' / 'reverse_config'. Raises FileNotFoundError if there is no forward model.
    """
    if not os.path.isfile(os.path.join(out_dir, "forward.safetensors")):
        raise FileNotFoundError(f"{out_dir} has no forward.safetensors: not an export directory")
    loaded: dict[str, Any] = {}
    for part in PARTS:
        weights = os.path.join(out_dir, f"{part}.safetensors")
        if not os.path.isfile(weights):
            continue
        with open(os.path.join(out_dir, f"{part}_config.json")) as f:
            config = json.load(f)
        model = _port(part).from_config(config)
        model.load_state_dict(load_file(weights), strict=True)
        loaded[part] = model.to(device).eval()
        loaded[f"{part}_config"] = config
    return loaded


__all__ = ["Model", "PARTS", "load"]

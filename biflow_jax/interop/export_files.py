"""The export writer: a flow and BiFlow's G as PyTorch-side files (safetensors + JSON configs).

Export: `forward.safetensors` holds exactly ml-tarflow's `transformer_flow.Model` state_dict
(TARFlow, arXiv:2412.06329) and `forward_config.json` its constructor arguments, unless the
flow uses improved-flow options ml-tarflow lacks (RoPE, SwiGLU, ...; STARFlow arXiv:2506.06276):
then only `biflow_jax.torch.tarflow.Model` reads it, and config and metadata say so;
`reverse.safetensors` / `reverse_config.json` hold BiFlow's G for `biflow_jax.torch`.
Pure functions of arrays and configs; workdirs are biflow_jax.modes.export's business (reading
torch checkpoints back: interop.state_dicts).
"""

from __future__ import annotations

import json
import os
from typing import Any

from safetensors.numpy import save_file

from biflow_jax.architecture import flow_options
from biflow_jax.interop.reverse_layout import reverse_params_to_state_dict
from biflow_jax.interop.tarflow_layout import flow_params_to_state_dict, ml_tarflow_lacks

FORWARD_WEIGHTS = "forward.safetensors"
FORWARD_CONFIG = "forward_config.json"
REVERSE_WEIGHTS = "reverse.safetensors"
REVERSE_CONFIG = "reverse_config.json"
def forward_config(config: Any) -> dict[str, Any]:
    """ml-tarflow's `Model(...)` arguments for this flow, plus our extras.

    Extras: head_dim, expansion, clip (architecture), and the training noise (noise_type,
    noise_std) so a PyTorch user knows what the model's data distribution was. A flow with
    improved-flow options also records them (rope, norm, qk_norm, mlp, block_layers, clip_shift) and
    `ml_tarflow_compatible: false`; a default flow's file stays exactly ml-tarflow's arguments
    plus the extras above, as it always was.
    """
    model = config.model
    train = config.get("train", None) or {}
    options = {}
    if ml_tarflow_lacks(model):
        given = flow_options(model)
        options = {"rope": given["rope"], "norm": str(given["norm"]), "qk_norm": given["qk_norm"],
                   "mlp": str(given["mlp"]), "block_layers": [int(n) for n in (model.get("block_layers") or ())],
                   "clip_shift": given["clip_shift"],
                   "ml_tarflow_compatible": False}
    return options | {
        "in_channels": int(model.in_channels),
        "img_size": int(model.img_size),
        "patch_size": int(model.patch_size),
        "channels": int(model.channels),
        "num_blocks": int(model.num_blocks),
        "layers_per_block": int(model.layers_per_block),
        "nvp": True,
        "num_classes": int(model.num_classes),
        "head_dim": int(model.head_dim),
        "expansion": int(model.expansion),
        "clip": float(model.clip),
        "noise_type": train.get("noise", None),
        "noise_std": train.get("noise_std", None),
        "trained_dtype": str(model.dtype),
    }


def forward_layout_name(model_cfg: Any) -> str:
    """The safetensors `layout` metadata: which PyTorch class the state_dict belongs to."""
    lacks = ml_tarflow_lacks(model_cfg)
    if not lacks:
        return "ml-tarflow transformer_flow.Model"
    return f"biflow_jax.torch.tarflow.Model (options ml-tarflow lacks: {', '.join(lacks)})"


def forward_export_note(model_cfg: Any) -> str | None:
    """One line for the export command when ml-tarflow cannot load the flow; None when it can."""
    lacks = ml_tarflow_lacks(model_cfg)
    if not lacks:
        return None
    return (f"note: this flow uses {', '.join(lacks)}: biflow_jax.torch.load reads it; "
            "apple/ml-tarflow's transformer_flow.Model cannot")


def export_flow(config: Any, params: Any, out_dir: str) -> dict[str, str]:
    """Write the flow's weights and config into `out_dir` (created if needed); return the paths."""
    state_dict = flow_params_to_state_dict(params, config.model)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"weights": os.path.join(out_dir, FORWARD_WEIGHTS), "config": os.path.join(out_dir, FORWARD_CONFIG)}
    save_file(state_dict, paths["weights"], metadata={"format": "pt", "layout": forward_layout_name(config.model)})
    with open(paths["config"], "w") as f:
        json.dump(forward_config(config), f, indent=2, sort_keys=True)
    return paths


def reverse_export_config(model: Any, flow_model_cfg: Any, dtype: str) -> dict[str, Any]:
    """Every constructor argument of G (a built `ReverseViT`) plus the forward side's image geometry.

    The arguments are read off the model itself, so defaults a config leaves out
    (guidance_embed_dim) are recorded too; `stage_sizes` is the resolved split and
    `trained_dtype` (G's compute dtype name) what G computed in.
    """
    flow = flow_model_cfg
    patch = int(flow.patch_size)
    num_tokens = (int(flow.img_size) // patch) ** 2
    token_dim = int(flow.in_channels) * patch * patch
    layers = model.layers_per_stage
    return {
        "num_tokens": num_tokens,
        "token_dim": token_dim,
        "num_forward_blocks": int(model.num_forward_blocks),
        "depth": int(model.depth),
        "width": int(model.width),
        "heads": int(model.heads),
        "mlp_ratio": float(model.mlp_ratio),
        "layers_per_stage": None if layers is None else [int(n) for n in layers],
        "num_classes": int(model.num_classes),
        "guidance_conditioning": bool(model.guidance_conditioning),
        "guidance_embed_dim": int(model.guidance_embed_dim),
        "stage_bottleneck": bool(model.stage_bottleneck),
        "stage_sizes": [int(n) for n in model.stage_sizes],
        "patch_size": patch,
        "img_size": int(flow.img_size),
        "in_channels": int(flow.in_channels),
        "trained_dtype": str(dtype),
    }


def export_reverse(reverse_config: dict[str, Any], reverse_params: Any, out_dir: str) -> dict[str, str]:
    """Write G's weights (float32) and its `reverse_export_config` into `out_dir`; return the paths.

    Raises ValueError naming any param the config does not expect, before writing anything.
    """
    state_dict = reverse_params_to_state_dict(reverse_params, reverse_config)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"weights": os.path.join(out_dir, REVERSE_WEIGHTS), "config": os.path.join(out_dir, REVERSE_CONFIG)}
    layout = "biflow_jax.torch.reverse.ReverseModel"
    save_file(state_dict, paths["weights"], metadata={"format": "pt", "layout": layout})
    with open(paths["config"], "w") as f:
        json.dump(reverse_config, f, indent=2, sort_keys=True)
    return paths

"""Export a trained flow or BiFlow to PyTorch: `python -m biflow_jax.interop.export --workdir=DIR --out=OUT`.

Writes OUT/forward.safetensors (apple/ml-tarflow's state_dict names and layout, float32)
and OUT/forward_config.json (ml-tarflow's constructor arguments plus ours), which
`biflow_jax.torch.load(OUT)` turns back into a PyTorch model. No torch needed here.
For a stage-2 (BiFlow) workdir it also writes the reverse model G as
OUT/reverse.safetensors + OUT/reverse_config.json (names: `biflow_jax.interop.reverse_layout`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from safetensors.numpy import save_file

from biflow_jax.interop.reverse_layout import reverse_params_to_state_dict
from biflow_jax.interop.tarflow_layout import flow_params_to_state_dict

FORWARD_WEIGHTS = "forward.safetensors"
FORWARD_CONFIG = "forward_config.json"
REVERSE_WEIGHTS = "reverse.safetensors"
REVERSE_CONFIG = "reverse_config.json"
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)


def forward_config(config: Any) -> dict[str, Any]:
    """ml-tarflow's `Model(...)` arguments for this flow, plus our extras.

    Extras: head_dim, expansion, clip (architecture), and the training noise (noise_type,
    noise_std) so a PyTorch user knows what the model's data distribution was.
    """
    model = config.model
    train = config.get("train", None) or {}
    return {
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


def export_flow(config: Any, params: Any, out_dir: str) -> dict[str, str]:
    """Write the flow's weights and config into `out_dir` (created if needed); return the paths."""
    state_dict = flow_params_to_state_dict(params, config.model)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"weights": os.path.join(out_dir, FORWARD_WEIGHTS), "config": os.path.join(out_dir, FORWARD_CONFIG)}
    save_file(state_dict, paths["weights"], metadata={"format": "pt", "layout": "ml-tarflow transformer_flow.Model"})
    with open(paths["config"], "w") as f:
        json.dump(forward_config(config), f, indent=2, sort_keys=True)
    return paths


def reverse_export_config(config: Any) -> dict[str, Any]:
    """Every constructor argument of G (`ReverseViT`) plus the forward side's image geometry.

    `config.reverse` is G's section and `config.model` the forward flow's (a stage-2
    config has both). The arguments are read off the model `build_reverse` makes, so
    defaults the config leaves out (guidance_embed_dim) are recorded too; `stage_sizes`
    is the resolved split, `trained_dtype` what G computed in.
    """
    from biflow_jax.models.reverse import build_reverse  # flax; keeps a forward-only export light

    flow = config.model
    patch = int(flow.patch_size)
    num_tokens = (int(flow.img_size) // patch) ** 2
    token_dim = int(flow.in_channels) * patch * patch
    model = build_reverse(config.reverse, num_tokens, token_dim, int(flow.num_blocks))
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
        "trained_dtype": str(config.reverse.dtype),
    }


def export_reverse(config: Any, reverse_params: Any, out_dir: str) -> dict[str, str]:
    """Write G's weights (float32) and config into `out_dir` (created if needed); return the paths.

    A pure function of (config, params): `config` needs the `model` and `reverse` sections.
    Raises ValueError naming any param the config does not expect, before writing anything.
    """
    reverse_config = reverse_export_config(config)
    state_dict = reverse_params_to_state_dict(reverse_params, reverse_config)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"weights": os.path.join(out_dir, REVERSE_WEIGHTS), "config": os.path.join(out_dir, REVERSE_CONFIG)}
    layout = "biflow_jax.torch.reverse.ReverseModel"
    save_file(state_dict, paths["weights"], metadata={"format": "pt", "layout": layout})
    with open(paths["config"], "w") as f:
        json.dump(reverse_config, f, indent=2, sort_keys=True)
    return paths


def is_stage2_workdir(workdir: str) -> bool:
    """True for a BiFlow (stage-2) run: its config.json says stage 'biflow'."""
    from biflow_jax.checkpoint import read_config

    return read_config(workdir).get("stage", "flow") == "biflow"


def resolve_workdir(workdir: str) -> str:
    """The run directory to export: `workdir` itself, or for a two-stage ('both') job directory
    without its own config.json, its `reverse` (stage-2) run."""
    from biflow_jax.checkpoint import CONFIG_FILE

    nested = os.path.join(workdir, "reverse")
    if not os.path.exists(os.path.join(workdir, CONFIG_FILE)) and os.path.exists(os.path.join(nested, CONFIG_FILE)):
        return nested
    return workdir


def export_workdir(workdir: str, out_dir: str, ema: bool = True) -> list[dict[str, str]]:
    """Export a stage-1 workdir (the flow) or a stage-2 one (its frozen flow and G); return the paths.

    For stage 2 the flow is the EMA flow of `config.forward_workdir` (what G was trained
    against), and `ema` picks G's EMA or raw weights.
    """
    from biflow_jax.checkpoint import load_flow  # heavy (Orbax); only needed by the CLI

    workdir = resolve_workdir(workdir)
    if not is_stage2_workdir(workdir):
        config, _, params = load_flow(workdir, ema=ema)
        return [export_flow(config, params, out_dir)]
    from biflow_jax.reverse_training import load_reverse

    config, _, reverse_params, _, flow_params = load_reverse(workdir, ema=ema)
    reverse_config = reverse_export_config(config)  # check G's config before writing anything
    reverse_params_to_state_dict(reverse_params, reverse_config)
    return [export_flow(config, flow_params, out_dir), export_reverse(config, reverse_params, out_dir)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m biflow_jax.interop.export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True,
                        help="a stage-1 (flow) or stage-2 (BiFlow: flow + reverse model) training workdir")
    parser.add_argument("--out", required=True, help="directory to write the export into")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="export the EMA weights (default) or, with --no-ema, the raw ones")
    args = parser.parse_args(argv)

    try:
        written = export_workdir(args.workdir, args.out, ema=args.ema)
    except USER_ERRORS as err:  # like biflow_jax.main: a message and exit code 2, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for paths in written:
        print(f"wrote {paths['weights']} and {paths['config']}")


if __name__ == "__main__":
    main()

"""Export a trained forward flow to PyTorch: `python -m biflow_jax.export --workdir=DIR --out=OUT`.

Writes OUT/forward.safetensors (apple/ml-tarflow's state_dict names and layout, float32)
and OUT/forward_config.json (ml-tarflow's constructor arguments plus ours), which
`biflow_jax.torch.load(OUT)` turns back into a PyTorch model. No torch needed here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from safetensors.numpy import save_file

from biflow_jax.torch_names import flow_params_to_state_dict

FORWARD_WEIGHTS = "forward.safetensors"
FORWARD_CONFIG = "forward_config.json"
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m biflow_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a stage-1 training workdir")
    parser.add_argument("--out", required=True, help="directory to write the export into")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="export the EMA weights (default) or, with --no-ema, the raw ones")
    args = parser.parse_args(argv)

    from biflow_jax.checkpoint import load_flow  # heavy (Orbax); only needed by the CLI

    try:
        config, _, params = load_flow(args.workdir, ema=args.ema)
        paths = export_flow(config, params, args.out)
    except USER_ERRORS as err:  # like biflow_jax.main: a message and exit code 2, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {paths['weights']} and {paths['config']}")


if __name__ == "__main__":
    main()

"""Export a trained flow or BiFlow to PyTorch: `python -m biflow_jax.export --workdir=DIR --out=OUT`.

Writes OUT/forward.safetensors (apple/ml-tarflow's state_dict names and layout, float32)
and OUT/forward_config.json (ml-tarflow's constructor arguments plus ours), which
`biflow_jax.torch.load(OUT)` turns back into a PyTorch model. No torch needed here.
A flow with improved-flow options (RoPE, SwiGLU, ...) gets a note: only biflow_jax.torch
reads it, ml-tarflow cannot.
For a stage-2 (BiFlow) workdir it also writes the reverse model G as
OUT/reverse.safetensors + OUT/reverse_config.json (names: `biflow_jax.interop.reverse_layout`).
"""

from __future__ import annotations

import argparse
import json
import sys

from biflow_jax import runs
from biflow_jax.errors import EXPECTED_ERRORS
from biflow_jax.interop.export_files import export_flow, export_reverse, forward_export_note, reverse_export_config
from biflow_jax.interop.reverse_layout import reverse_params_to_state_dict


def export_workdir(workdir: str, out_dir: str, ema: bool = True) -> list[dict[str, str]]:
    """Export a stage-1 run (the flow), or a stage-2 run or two-stage job dir (its frozen flow and G).

    For stage 2 the flow is the EMA flow of the stage-1 run G was trained against, and `ema`
    picks G's EMA or raw weights. Returns the written paths.
    """
    try:
        reverse_dir = runs.stage_dir(workdir, "biflow")
    except FileNotFoundError:
        reverse_dir = None
    if reverse_dir is None:
        flow = runs.load_flow(workdir, ema=ema)
        return [export_flow(flow.config, flow.params, out_dir)]
    run = runs.load_reverse(reverse_dir, ema=ema)
    reverse_config = reverse_export_config(run.model, run.flow.config.model, run.config.biflow.model.dtype)
    reverse_params_to_state_dict(run.params, reverse_config)  # check G's params before writing anything
    return [export_flow(run.flow.config, run.flow.params, out_dir),
            export_reverse(reverse_config, run.params, out_dir)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m biflow_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True,
                        help="a stage-1 (flow) or stage-2 (BiFlow: flow + reverse model) training workdir")
    parser.add_argument("--out", required=True, help="directory to write the export into")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="export the EMA weights (default) or, with --no-ema, the raw ones")
    args = parser.parse_args(argv)

    try:
        written = export_workdir(args.workdir, args.out, ema=args.ema)
    except EXPECTED_ERRORS as err:  # like biflow_jax.main: a message and exit code 2, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for paths in written:
        print(f"wrote {paths['weights']} and {paths['config']}")
    with open(written[0]["config"]) as f:  # the flow's forward_config.json holds its options
        note = forward_export_note(json.load(f))
    if note:
        print(note)


if __name__ == "__main__":
    main()

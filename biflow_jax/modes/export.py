"""A workdir exported to PyTorch: a stage-1 run's flow, or a stage-2 run's frozen flow and its G.

The files are interop.export_files' (apple/ml-tarflow's state_dict for the flow, TARFlow
arXiv:2412.06329; BiFlow's G, arXiv:2512.10953); this module only finds the runs in a workdir.
"""

from __future__ import annotations

import json

from biflow_jax import runs
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


def written_lines(written: list[dict[str, str]]) -> list[str]:
    """What an export wrote, for the console; last, a note when ml-tarflow cannot read the flow."""
    lines = [f"wrote {paths['weights']} and {paths['config']}" for paths in written]
    with open(written[0]["config"]) as f:  # the flow's forward_config.json holds its options
        note = forward_export_note(json.load(f))
    return lines + ([note] if note else [])

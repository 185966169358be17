"""Export a trained flow or BiFlow to PyTorch: `python -m biflow_jax.export --workdir=DIR --out=OUT [--noema]`.

Writes OUT/forward.safetensors (apple/ml-tarflow's state_dict names and layout, float32)
and OUT/forward_config.json (ml-tarflow's constructor arguments plus ours), which
`biflow_jax.torch.load(OUT)` turns back into a PyTorch model. No torch needed here.
A flow with improved-flow options (RoPE, SwiGLU, ...) gets a note: only biflow_jax.torch
reads it, ml-tarflow cannot.
For a stage-2 (BiFlow) workdir it also writes the reverse model G as
OUT/reverse.safetensors + OUT/reverse_config.json (names: `biflow_jax.interop.reverse_layout`).
"""

from __future__ import annotations

from biflow_jax import process_settings

process_settings.apply()  # process-wide, so here and not on import; before JAX runs anything

from absl import app, flags

from biflow_jax import config_files
from biflow_jax.modes import export

flags.DEFINE_string("workdir", None, "A stage-1 (flow) or stage-2 (BiFlow: flow + reverse model) training workdir.")
flags.DEFINE_string("out", None, "Directory to write the export into.")
flags.DEFINE_bool("ema", True, "Export the EMA weights (default) or, with --noema, the raw ones.")
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for line in export.written_lines(export.export_workdir(FLAGS.workdir, FLAGS.out, ema=FLAGS.ema)):
        print(line)


def run() -> None:
    """Entry point: expected errors print one line and exit 2, as in biflow_jax.main."""
    config_files.run_cli(main)


if __name__ == "__main__":
    run()

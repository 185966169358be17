"""Import a PyTorch TARFlow checkpoint as a stage-1 workdir.

    python -m biflow_jax.import_torch --checkpoint=FILE.pth --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE]

The work (validate everything, then write) is biflow_jax.modes.import_torch's.
"""

from __future__ import annotations

from biflow_jax import process_settings

process_settings.apply()  # process-wide, so here and not on import; before JAX runs anything

from absl import app, flags

from biflow_jax import config_files
from biflow_jax.modes import import_torch

flags.DEFINE_string("checkpoint", None, "A .pth file holding an ml-tarflow state_dict.")
flags.DEFINE_string("config", None, "The config file describing that model, with an optional :ARG.")
flags.DEFINE_string("workdir", None, "A new (or empty) workdir to create.")
flags.mark_flags_as_required(["checkpoint", "config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_files.apply_overrides(config_files.load(FLAGS.config), config_files.cli_overrides())
    import_torch.import_state_dict(import_torch.load_torch_checkpoint(FLAGS.checkpoint), config, FLAGS.workdir)
    print(f"imported {FLAGS.checkpoint} into {FLAGS.workdir}")


def run() -> None:
    """Entry point: expected errors print one line and exit 2, as in biflow_jax.main."""
    config_files.run_cli(main)


if __name__ == "__main__":
    run()

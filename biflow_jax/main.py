"""Command line: `python -m biflow_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR [--mode=...]`.

Config values can be overridden on the command line, e.g. `--config.optim.lr=3e-4`.
Modes: train (default: train or resume, report test bits/dim against a diagonal-Gaussian
baseline).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from biflow_jax import distributed

config_flags.DEFINE_config_file("config", "configs/digits.py", "Config file, with an optional :ARG.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints, TensorBoard events.")
flags.DEFINE_enum("mode", "train", ["train"], "What to do.")
FLAGS = flags.FLAGS


def run_train(config, workdir: str) -> None:
    from biflow_jax import train

    results = train.train_and_evaluate(config, workdir)
    baseline = train.gaussian_baseline_bpd(config, train.make_mesh())
    train.say(f"test bits/dim: flow (EMA) {results['test_bpd']:.4f} | diagonal-Gaussian baseline {baseline:.4f}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if not any(a.startswith(("-v", "--v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS are chatty at INFO; -v 0 brings it back
    distributed.initialize()
    from biflow_jax.checkpoint import CONFIG_FILE  # noqa: F401  (imports jax after distributed init)

    {"train": run_train}[FLAGS.mode](FLAGS.config, FLAGS.workdir)


def run() -> None:
    """Entry point: expected errors end the program with their message and exit code 2."""
    from biflow_jax.errors import EXPECTED_ERRORS

    try:
        app.run(main)
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()

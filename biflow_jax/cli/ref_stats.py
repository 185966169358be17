"""An ADM-format reference batch from a dataset: `python -m biflow_jax.cli.ref_stats --config=... --out=F.npz`.

What is written and why is biflow_jax.evaluators.ref_stats' (ADM, arXiv:2105.05233); this is its command line.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow or jaxlib print banners

from biflow_jax import process_settings

process_settings.apply()  # process-wide, so here and not on import; before JAX runs anything

import sys

from absl import app, flags, logging

from biflow_jax import config_files, distributed
from biflow_jax.errors import ConfigError
from biflow_jax.evaluators import ref_stats

flags.DEFINE_string("config", None, "Config file (its data section is read), with an optional :ARG.")
flags.DEFINE_string("out", None, "Output .npz (ADM reference batch format).")
flags.DEFINE_string("split", None, "Dataset split (default: config.data.train_split, as ADM's references).")
flags.DEFINE_integer("num_images", 10_000, "Images kept in arr_0 (for precision/recall); 0 keeps none.")
flags.DEFINE_string("inception", None, "pt_inception-2015-12-05-6726825d.pth (default evals.fid.inception).")
flags.DEFINE_bool("random_inception", False, "Random Inception weights: tests and the digits only.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.config:
        raise ConfigError("--config is required (its data section names the dataset)")
    if not any(a.startswith(("-v", "--v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)
    config = config_files.apply_overrides(config_files.load(FLAGS.config), config_files.cli_overrides())
    distributed.initialize()
    ref_stats.compute(config, FLAGS.out, FLAGS.split, FLAGS.num_images, FLAGS.inception, FLAGS.random_inception)


def run() -> None:
    """Entry point: expected errors print one line and exit 2, as in biflow_jax.main."""
    config_files.run_cli(main)


if __name__ == "__main__":
    run()

"""Encode an image dataset once through the frozen VAE: `python -m biflow_jax.cli.encode_latents`.

    python -m biflow_jax.cli.encode_latents --config=configs/imagenet256_latent.py:b2 --out=DIR \\
        [--splits=train,validation] [--config.KEY=VALUE]

Sharded over processes and resumable after a kill; the format and the work are biflow_jax.data.latents'.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow or jaxlib print banners

from biflow_jax import process_settings

process_settings.apply()  # process-wide, so here and not on import; before JAX runs anything

from absl import app, flags, logging

from biflow_jax import config_files, distributed
from biflow_jax.console import say
from biflow_jax.data import latents
from biflow_jax.errors import DataError

flags.DEFINE_string("config", None, "Config file with a `latent` section (e.g. configs/imagenet256_latent.py:b2).")
flags.DEFINE_string("out", None, "Output directory (default: the config's data.folder).")
flags.DEFINE_list("splits", None, "Splits to encode (default: latent.source's train and test splits).")
flags.mark_flag_as_required("config")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # TFDS and JAX are chatty at INFO
    config = config_files.apply_overrides(config_files.load(FLAGS.config), config_files.cli_overrides())
    out = FLAGS.out or config.data.get("folder", "")
    if not out:
        raise DataError("--out is required (or set data.folder): the directory the latents are written to")
    distributed.initialize()
    meta = latents.encode(config, out, FLAGS.splits or None)
    counts = ", ".join(f"{s} {v['num_examples']:,} examples in {v['num_shards']} shards"
                       for s, v in meta["splits"].items())
    say(f"latents {meta['latent_shape']} ({meta['dtype']}, image + flip) in {out}: {counts}")


def run() -> None:
    """Entry point: expected errors print one line and exit 2, as in biflow_jax.main."""
    config_files.run_cli(main)


if __name__ == "__main__":
    run()

"""Command line: `python -m biflow_jax.main --workdir=DIR [--config=configs/NAME.py[:ARG]] [--mode=...]`.

Config values are overridden with `--config.KEY=VALUE` (e.g. `--config.train.steps=100`).
A mode given only --workdir reads the run's own config.json. Modes (each one function):
  train      train the stages of config.stage (flow | biflow | both); the default
  describe   models, parameter counts, token grids, classes, FLOPs per image; no data, no weights
  sample     exact-inverse samples from a stage-1 flow (or the flow of a job / stage-2 dir)
  classify   a stage-1 flow as a training-free classifier, and a linear probe
  inpaint / class_edit   training-free editing with a stage-2 (BiFlow) run
  eval       FID-50K (FID, sFID, IS, precision/recall) of exact-inverse or BiFlow samples, or of --samples
Expected errors (bad config, data, workdir or weights) print one line and exit 2.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow or jaxlib print banners

from absl import app, flags, logging  # noqa: E402

from biflow_jax import config_files, distributed  # noqa: E402
from biflow_jax.errors import EXPECTED_ERRORS, ConfigError  # noqa: E402

MODES = ("train", "describe", "sample", "classify", "inpaint", "class_edit", "eval")

flags.DEFINE_string("config", None, "Config file, with an optional :ARG (default: WORKDIR/config.json).")
flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints, TensorBoard events.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_integer("num_images", None, "sample: how many images (default config.sample.num_images).")
flags.DEFINE_list("labels", None, "sample: class labels, cycled over the images (default: balanced).")
flags.DEFINE_enum("solver", None, ["cached", "jacobi", "naive"], "sample: exact-inverse solver.")
flags.DEFINE_integer("seed", 0, "sample / editing: random seed.")
flags.DEFINE_string("out_dir", None, "sample / editing: output folder (default under WORKDIR/samples).")
flags.DEFINE_enum("sampler", None, ["exact", "biflow"], "eval: sampler (default: biflow when the workdir has one).")
flags.DEFINE_string("ref", None, "eval: ADM-format reference batch .npz (default evals.fid.reference).")
flags.DEFINE_string("samples", None, "eval: score this ADM-format sample .npz (arr_0 uint8 NHWC) instead.")
flags.DEFINE_string("inception", None, "eval: pt_inception-2015-12-05-6726825d.pth (default evals.fid.inception).")
flags.DEFINE_bool("random_inception", False, "eval: random Inception weights, for tests and the digits only.")
FLAGS = flags.FLAGS

OVERRIDES: list[str] = []


def resolve_config(workdir: str | None, mode: str):
    """The config a mode runs with: --config if given, else the workdir's config.json; then overrides."""
    if FLAGS.config:
        config = config_files.load(FLAGS.config)
    elif workdir and os.path.isfile(os.path.join(workdir, "config.json")):
        from biflow_jax import runs

        config = runs.read_config(workdir)
        config.lock()
    elif mode == "train":
        raise ConfigError("--config is required to train a new run (e.g. --config=configs/digits.py)")
    else:
        return None
    return config_files.apply_overrides(config, OVERRIDES)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir and FLAGS.mode != "describe":
        raise app.UsageError("--workdir is required")
    if not any(a.startswith(("-v", "--v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS are chatty at INFO; -v 0 brings it back
    config = resolve_config(FLAGS.workdir, FLAGS.mode)
    if FLAGS.mode == "describe":
        from biflow_jax.modes import describe

        if config is None:
            raise ConfigError("describe needs --config or a --workdir holding config.json")
        describe.run(config)
        return
    distributed.initialize()
    workdir = FLAGS.workdir
    if FLAGS.mode == "train":
        from biflow_jax.modes import train

        train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == "sample":
        from biflow_jax.console import say
        from biflow_jax.modes import sample

        labels = [int(v) for v in FLAGS.labels] if FLAGS.labels else None
        out = sample.run_sample(workdir, num_images=FLAGS.num_images, labels=labels, out_dir=FLAGS.out_dir,
                                solver=FLAGS.solver, seed=FLAGS.seed, config=config)
        say(f"exact-inverse samples ({out['solver']} solver, {out['num_images']} images, "
            f"{out['images_per_s']:.1f} images/s incl. compile): {out['samples_png']}")
    elif FLAGS.mode == "eval":
        from biflow_jax.modes import eval as eval_mode

        eval_mode.run_eval(workdir, config, sampler=FLAGS.sampler, ref=FLAGS.ref, samples=FLAGS.samples,
                           num_samples=FLAGS.num_images, inception=FLAGS.inception,
                           random_inception=FLAGS.random_inception,
                           seed=FLAGS.seed if FLAGS["seed"].present else None)
    elif FLAGS.mode == "classify":
        from biflow_jax.modes import classify

        classify.run(workdir, data=config.data if config is not None else None)
    else:
        from biflow_jax.console import say
        from biflow_jax.modes import edit

        run = edit.run_inpaint if FLAGS.mode == "inpaint" else edit.run_class_edit
        out = run(workdir, out_dir=FLAGS.out_dir)
        say(f"{FLAGS.mode}: {out['grid']}")


def run() -> None:
    """Entry point: expected errors end the program with their message and exit code 2."""
    global OVERRIDES
    try:
        argv, OVERRIDES = config_files.split_overrides(sys.argv)
        app.run(main, argv=argv)
    except EXPECTED_ERRORS as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()

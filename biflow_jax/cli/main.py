"""Command line: `python -m biflow_jax.main --workdir=DIR [--config=configs/NAME.py[:ARG]] [--mode=...]`.

Config values are overridden with `--config.KEY=VALUE` (e.g. `--config.train.steps=100`).
A mode given only --workdir reads the run's own config.json. Modes (each one function):
  train      train the stages of config.stage (flow | biflow | both); the default
  describe   models, parameter counts, token grids, classes, FLOPs per image; no data, no weights
  compile    compile every stage's programs for a TPU slice (--topology=v5e:2x4) on any host: per-chip HBM,
             FLOPs, compile time; exit 2 naming settings that fit when a program does not
  sample     samples into a new WORKDIR/samples/<settings>/ folder: the flow's exact inverse
             (--sampler=exact|jacobi|naive) or BiFlow's 1-NFE G (--sampler=biflow), --w, --seed
  classify   a stage-1 flow as a training-free classifier, and a linear probe
  inpaint / class_edit   training-free editing with a stage-2 (BiFlow) run, with a measured result
  eval       FID-50K (FID, sFID, IS, precision/recall) of exact-inverse or BiFlow samples, or of --samples
Expected errors (bad config, data, workdir or weights) print one line and exit 2.
"""

from __future__ import annotations

import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow or jaxlib print banners
# TensorFlow (only tf.data here) announces its oneDNN kernels once per loaded library, whatever the
# log level; without them it prints nothing. JAX's own CPU kernels are not affected.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from biflow_jax import process_settings  # noqa: E402

process_settings.apply(sys.argv)  # process-wide, so here and not on import; before JAX runs anything

from absl import app, flags, logging  # noqa: E402

from biflow_jax import config_files, distributed  # noqa: E402
from biflow_jax.errors import ConfigError  # noqa: E402

MODES = ("train", "describe", "compile", "sample", "classify", "inpaint", "class_edit", "eval")

flags.DEFINE_string("config", None, "Config file, with an optional :ARG (default: WORKDIR/config.json).")
flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints, TensorBoard events.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_integer("num_images", None, "sample / editing / eval: how many images (sample: default "
                     "config.sample.num_images; editing: the first 100 test images).")
flags.DEFINE_list("labels", None, "sample: class labels, cycled over the images (default: balanced).")
flags.DEFINE_enum("sampler", None, ["exact", "jacobi", "naive", "biflow"],
                  "sample: the flow's exact inverse (KV-cached, Jacobi or naive decoding; default exact) or "
                  "BiFlow's G in one pass. eval: exact or biflow (default: biflow when the workdir has one).")
flags.DEFINE_float("w", None, "sample / editing: guidance; the exact inverse's CFG scale (default "
                   "config.sample.guidance) or G's trained-in scale (default config.biflow.guidance).")
flags.DEFINE_integer("seed", 0, "sample / editing: random seed.")
flags.DEFINE_string("out_dir", None, "sample / editing: output folder (default: a new "
                    "WORKDIR/samples/<settings>/).")
flags.DEFINE_string("ref", None, "eval: ADM-format reference batch .npz (default evals.fid.reference).")
flags.DEFINE_string("samples", None, "eval: score this ADM-format sample .npz (arr_0 uint8 NHWC) instead.")
flags.DEFINE_string("inception", None, "eval: pt_inception-2015-12-05-6726825d.pth (default evals.fid.inception).")
flags.DEFINE_bool("random_inception", False, "eval: random Inception weights, for tests and the digits only.")
flags.DEFINE_string("topology", None, "compile: a TPU slice, e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x2, v5e:4x4 "
                    "(default config.parallel.topology).")
flags.DEFINE_list("programs", None, "compile: only these stages or stage/program names (e.g. flow/train_step).")
flags.DEFINE_bool("fit_search", True, "compile: when a program does not fit, compile alternatives that do.")
FLAGS = flags.FLAGS

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
    return config_files.apply_overrides(config, config_files.cli_overrides())


def config_lines(config, prefix: str = "") -> list[str]:
    """The resolved config, one line per (sub)section: `train: batch_size=64 steps=2000 ...`."""
    import ml_collections

    values, lines = [], []
    for key, value in sorted(config.items()):
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            lines += config_lines(value, f"{prefix}{key}.")
        else:
            values.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    head = [f"  {prefix.rstrip('.') or '(top)'}: " + " ".join(values)] if values else []
    return head + lines


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir and FLAGS.mode not in ("describe", "compile"):
        raise app.UsageError("--workdir is required")
    if not any(a.startswith(("-v", "--v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS are chatty at INFO; -v 0 brings it back
    if FLAGS.w is not None and not math.isfinite(FLAGS.w):
        raise ConfigError(f"--w={FLAGS.w} must be a finite number")
    if FLAGS.workdir and FLAGS.mode != "describe":
        from biflow_jax import checkpoint

        checkpoint.check_path(FLAGS.workdir)  # before any mode's work: Orbax could not read checkpoints there
    config = resolve_config(FLAGS.workdir, FLAGS.mode)
    if FLAGS.mode == "describe":
        from biflow_jax.modes import describe

        if config is None:
            raise ConfigError("describe needs --config or a --workdir holding config.json")
        describe.run(config)
        return
    if FLAGS.mode == "compile":
        import jax

        if not os.environ.get("JAX_PLATFORMS"):  # the host only traces: never start a TPU runtime here
            jax.config.update("jax_platforms", "cpu")
        from biflow_jax.modes import compile as compile_mode

        if config is None:
            raise ConfigError("compile needs --config or a --workdir holding config.json")
        topology = FLAGS.topology or config.parallel.get("topology", "")
        if not topology:
            raise ConfigError("compile needs --topology (e.g. --topology=v5e:2x4) or a config naming "
                              "parallel.topology")
        compile_mode.run(config, topology, fit_search=FLAGS.fit_search, only=FLAGS.programs)
        return
    distributed.initialize()
    workdir = FLAGS.workdir
    if FLAGS.mode == "train":
        from biflow_jax.console import say
        from biflow_jax.modes import train

        count = len(config_files.cli_overrides())
        say(f"config ({FLAGS.config or os.path.join(workdir, 'config.json')} with {count} override(s); "
            "saved as WORKDIR/config.json):\n" + "\n".join(config_lines(config)))

        train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == "sample":
        from biflow_jax.console import say
        from biflow_jax.modes import sample

        labels = [int(v) for v in FLAGS.labels] if FLAGS.labels else None
        out = sample.run_sample(workdir, sampler=FLAGS.sampler, num_images=FLAGS.num_images, labels=labels,
                                out_dir=FLAGS.out_dir, seed=FLAGS.seed, config=config, w=FLAGS.w)
        say(sample.result_line(out))
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
        from biflow_jax.modes import edit

        run = edit.run_inpaint if FLAGS.mode == "inpaint" else edit.run_class_edit
        run(workdir, num_images=100 if FLAGS.num_images is None else FLAGS.num_images, seed=FLAGS.seed,
            out_dir=FLAGS.out_dir, w=FLAGS.w)


def run() -> None:
    """Entry point: expected errors end the program with their message and exit code 2."""
    config_files.run_cli(main)


if __name__ == "__main__":
    run()

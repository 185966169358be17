"""Command line: `python -m biflow_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR [--mode=...]`.

Config values can be overridden on the command line, e.g. `--config.optim.lr=3e-4`.
Modes: train (default: train or resume, report test bits/dim against a diagonal-Gaussian
baseline, write a grid of exact-inverse samples); sample (exact-inverse samples from the
workdir's EMA flow: --num_images, --labels, --solver, --out_dir); inpaint / class_edit
(training-free editing grids from a stage-2 workdir); classify (the workdir's EMA flow, or
WORKDIR/forward's, as a classifier: training-free top-1 and a linear probe, on the test split).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from biflow_jax import distributed

config_flags.DEFINE_config_file("config", "configs/digits.py", "Config file, with an optional :ARG.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints, TensorBoard events.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "classify", "inpaint", "class_edit"], "What to do.")
flags.DEFINE_integer("num_images", None, "sample: how many images (default config.sample.num_images).")
flags.DEFINE_list("labels", None, "sample: class labels, cycled over the images (default: balanced).")
flags.DEFINE_enum("solver", None, ["cached", "jacobi", "naive"], "sample: exact-inverse solver.")
flags.DEFINE_string("out_dir", None, "sample: where samples.png/.npz go (default WORKDIR/samples).")
FLAGS = flags.FLAGS


def run_train(config, workdir: str) -> None:
    """config.stage: flow (stage 1 in WORKDIR), biflow (stage 2 in WORKDIR), or both
    (WORKDIR/forward then WORKDIR/reverse, then exact inverse and BiFlow side by side)."""
    import os

    stage = config.get("stage", "flow")
    if stage == "flow":
        run_stage1(config, workdir)
    elif stage == "biflow":
        run_stage2(config, workdir)
    elif stage == "both":
        forward = os.path.join(workdir, "forward")
        run_stage1(config, forward)
        run_stage2(config, os.path.join(workdir, "reverse"), forward_workdir=forward)
    else:
        raise ValueError(f"config.stage={stage!r} must be 'flow', 'biflow' or 'both'")


def run_stage1(config, workdir: str) -> None:
    from biflow_jax import train

    results = train.train_and_evaluate(config, workdir)
    baseline = train.gaussian_baseline_bpd(config, train.make_mesh())
    train.say(f"test bits/dim: flow (EMA) {results['test_bpd']:.4f} | diagonal-Gaussian baseline {baseline:.4f}")
    if jax_is_main():
        run_sample(config, workdir)


def run_stage2(config, workdir: str, forward_workdir: str | None = None) -> None:
    from biflow_jax import reverse_training, train
    from biflow_jax.modes import compare

    results = reverse_training.train_reverse(reverse_training.stage2_config(config, forward_workdir), workdir)
    train.say(f"BiFlow reverse model: test reconstruction MSE of G(F(x)) (EMA) {results['test_recon_mse']:.4f}")
    if jax_is_main():
        figures = compare.compare(workdir)
        train.say(f"exact inverse vs BiFlow on the same noise: {figures['grid']}")
        train.say(f"speed: exact inverse {figures['exact_images_per_s']:.1f} images/s, BiFlow 1-NFE "
                  f"{figures['biflow_images_per_s']:.1f} images/s ({figures['speedup']:.1f}x)")
        if "exact_frechet" in figures:
            train.say("digits quality (classifier features; lower Frechet and higher label accuracy are better): "
                      f"exact inverse FD {figures['exact_frechet']:.3f} acc {figures['exact_label_accuracy']:.3f} | "
                      f"BiFlow (w={figures['biflow_w']:g}) FD {figures['biflow_frechet']:.3f} "
                      f"acc {figures['biflow_label_accuracy']:.3f} | BiFlow (w=0) FD "
                      f"{figures['biflow_w0_frechet']:.3f} acc {figures['biflow_w0_label_accuracy']:.3f}")


def run_sample(config, workdir: str) -> None:
    from biflow_jax import train
    from biflow_jax.modes import sample

    labels = [int(v) for v in FLAGS.labels] if FLAGS.labels else None
    out = sample.run_sample(config, workdir, num_images=FLAGS.num_images, labels=labels,
                            out_dir=FLAGS.out_dir, solver=FLAGS.solver)
    train.say(f"exact-inverse samples ({out['solver']} solver, {out['num_images']} images, "
              f"{out['images_per_s']:.1f} images/s incl. compile): {out['samples_png']}")


def run_edit(config, workdir: str) -> None:
    """Training-free editing with a stage-2 (BiFlow) workdir: inpainting or class editing grids."""
    del config  # the workdir's own config is used
    from biflow_jax import train
    from biflow_jax.modes import edit

    out = (edit.run_inpaint if FLAGS.mode == "inpaint" else edit.run_class_edit)(
        workdir, out_dir=FLAGS.out_dir)
    train.say(f"{FLAGS.mode}: {out['grid']}")


def jax_is_main() -> bool:
    import jax

    return jax.process_index() == 0


def run_classify(config, workdir: str) -> None:
    """The stage-1 flow of WORKDIR (or of WORKDIR/forward, for a two-stage run) as a classifier."""
    import os

    from biflow_jax import checkpoint, train
    from biflow_jax.evaluators import classify

    forward = os.path.join(workdir, "forward")
    if not os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)) and os.path.isdir(forward):
        workdir = forward
    saved, model, params = checkpoint.load_flow(workdir)
    if config.data.name == saved.data.name:
        saved.data = config.data  # where the data lives on this machine
    results = classify.evaluate(saved, model, params)
    if model.num_classes:
        train.say("training-free top-1 (test, one backward pass): "
                  f"{results['training_free_top1_dequantized']:.4f} dequantised inputs, "
                  f"{results['training_free_top1_clean']:.4f} clean inputs")
    else:
        train.say("training-free classification skipped: the flow is unconditional")
    probe = results["probe"]
    table = ", ".join(f"{b},{l}: {acc:.3f}" for (b, l), acc in sorted(probe.test_top1_by_location.items()))
    train.say(f"linear probe top-1 (test): {probe.test_top1:.4f} at block {probe.location[0]} layer "
              f"{probe.location[1]} (chosen on held-out train, ridge {probe.strength:g}); "
              f"by (block,layer): {table}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if not any(a.startswith(("-v", "--v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS are chatty at INFO; -v 0 brings it back
    distributed.initialize()
    from biflow_jax.checkpoint import CONFIG_FILE  # noqa: F401  (imports jax after distributed init)

    modes = {"train": run_train, "sample": run_sample, "classify": run_classify, "inpaint": run_edit,
             "class_edit": run_edit}
    modes[FLAGS.mode](FLAGS.config, FLAGS.workdir)


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """Parse flags so a bad `--config.KEY=...` override gets a plain message, not a traceback."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:  # config_flags' report of a key the config lacks
        key = str(e).strip("\"'")
        culprit = [a for a in argv if a.startswith("--config.") and key in a.split("=")[0]]
        where = f" (from {culprit[0].split('=')[0]})" if culprit else ""
        print(f"error: unknown config key {key!r}{where}; see the config file for valid keys", file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    """Entry point: expected errors end the program with their message and exit code 2."""
    from biflow_jax.errors import EXPECTED_ERRORS

    try:
        app.run(main, flags_parser=parse_flags_or_exit)
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()

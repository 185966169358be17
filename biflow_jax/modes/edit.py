"""Training-free editing with a trained BiFlow (arXiv:2512.10953) on test images, with a measured result.

inpaint: the top half of each image is known. F encodes the image (with the flow's
training noise, the input G learned to invert), the noise tokens of the unknown half are
drawn anew, G decodes in one pass, and the known pixels are pasted back (the usual
convention: the known region of the result is the original). Measured: the error of the
unknown region against the original, next to filling it with the mean training image.
class_edit: z = F(x~ | y), then G(z | y') for every class y'. Measured on the digits: how
often the digits classifier (evaluators/digits_quality.py) names the target class.

Both write a new folder WORKDIR/samples/<mode>_w<w>_seed<seed>_n<N>/ with a captioned PNG
and metrics.json, and add the grid and figures to the stage-2 run's TensorBoard.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax import image_grids, latent_space, likelihood, runs
from biflow_jax.console import say
from biflow_jax.data import input_pipeline
from biflow_jax.errors import ConfigError
from biflow_jax.evaluators import reconstruction
from biflow_jax.modes.sample import biflow_guidance, writing_into
from biflow_jax.samplers import exact_inverse, one_nfe

INPAINT_DRAWS = 3  # inpaintings per image, each from other noise for the unknown half
GRID_IMAGES = 10  # test images shown in a grid (all num_images are measured)
CHUNK = 100  # images per call of F and G


def test_images(run: runs.ReverseRun, num_images: int, seed: int) -> dict[str, Any]:
    """The first `num_images` test images: uint8, clean in [-1, 1], F's noised input, labels."""
    if num_images <= 0:
        raise ConfigError(f"--num_images={num_images} must be positive")
    batch = next(input_pipeline.eval_batches(run.config.data, num_images))
    keep = np.asarray(batch["mask"], bool)
    images_u8, labels = np.asarray(batch["image"])[keep], np.asarray(batch["label"])[keep]
    noise = run.flow.config.train
    x_encode = reconstruction.noised_inputs(jnp.asarray(images_u8), jnp.arange(len(labels)), noise.noise,
                                            float(noise.noise_std), seed)
    return {"uint8": images_u8, "clean": likelihood.to_unit_range(jnp.asarray(images_u8)), "encode": x_encode,
            "labels": jnp.asarray(labels, jnp.int32)}


def bound_models(run: runs.ReverseRun, w: float | None) -> tuple[Any, Any, float]:
    w = biflow_guidance(run.config, run.model, w)
    encode = one_nfe.flow_encoder(run.flow.model, run.flow.params)
    decode = one_nfe.reverse_decoder(run.model, run.params, w)
    return encode, decode, w


def output_dir(workdir: str, out_dir: str | None, mode: str, w: float, seed: int, n: int) -> str:
    path = out_dir or os.path.join(workdir, "samples", f"{mode}_w{w:g}_seed{seed}_n{n}")
    os.makedirs(path, exist_ok=True)
    return path


def write_metrics(path: str, metrics: dict[str, Any]) -> None:
    with open(os.path.join(path, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)


def write_outputs(run: runs.ReverseRun, path: str, mode: str, grid: np.ndarray, metrics: dict[str, Any],
                  logged: tuple[str, ...]) -> dict[str, Any]:
    """PATH/<mode>.png, PATH/metrics.json and the grid plus the `logged` metrics in the run's TensorBoard."""
    png = image_grids.save_png(grid, os.path.join(path, f"{mode}.png"))
    write_metrics(path, metrics)
    name = os.path.basename(os.path.normpath(path))
    image_grids.to_tensorboard(run.workdir, run.step, images={f"{mode}/{name}": grid},
                         scalars={f"{mode}/{k}": v for k, v in metrics.items() if k in logged})
    return {"grid": png, "metrics": metrics, "out_dir": path}


def digits_classifier(run: runs.ReverseRun):
    """The digits classifier cached beside the stage-2 run, or None when the data are not the digits."""
    if run.config.data.name != "digits":
        return None
    from biflow_jax.evaluators import digits_quality

    return digits_quality.load_or_train_classifier(digits_quality.classifier_dir(run.workdir))


def run_inpaint(workdir: str, num_images: int = 100, seed: int = 0, out_dir: str | None = None,
                w: float | None = None) -> dict[str, Any]:
    """Inpaint the bottom half of `num_images` test images INPAINT_DRAWS times; grid, figures, paths."""
    with writing_into(workdir, "biflow"):
        run = runs.load_reverse(workdir)
        latent_space.require_pixel_space(run.config, "editing")
        flow = run.flow.model
        data = test_images(run, num_images, seed)
        n = len(data["labels"])
        y = data["labels"] if flow.num_classes else None
        encode, decode, w = bound_models(run, w)
        x = data["clean"]
        mask = jnp.zeros(x.shape, bool).at[:, : x.shape[1] // 2].set(True)
        draws = []
        for k in range(INPAINT_DRAWS):
            parts = []
            for a in range(0, n, CHUNK):
                b = min(a + CHUNK, n)
                result = one_nfe.inpaint(encode, decode, x[a:b], mask[a:b], None if y is None else y[a:b],
                                         jax.random.fold_in(jax.random.key(seed), k * n + a),
                                         patch_size=flow.patch_size, x_encode=data["encode"][a:b])
                parts.append(exact_inverse.images_to_uint8(result.images))
            draws.append(np.concatenate(parts))
        original = data["uint8"].astype(np.int32)
        unknown = ~np.asarray(mask)
        errors = np.stack([np.abs(d.astype(np.int32) - original)[unknown] for d in draws])
        known_diff = max(int(np.abs(d.astype(np.int32) - original)[~unknown].max(initial=0)) for d in draws)
        metrics: dict[str, Any] = {
            "num_images": n, "draws_per_image": INPAINT_DRAWS, "seed": seed, "w": w, "known": "top half",
            "unknown_mae_255": float(errors.mean()),
            "unknown_rmse_255": float(np.sqrt(np.mean(errors.astype(np.float64) ** 2))),
            "known_max_abs_diff_255": known_diff,
        }
        train_images, _ = input_pipeline.split_arrays(run.config.data, run.config.data.train_split) \
            if run.config.data.name == "digits" else (None, None)
        if train_images is not None:  # two fills that know nothing of the image, for scale
            mean_fill = np.round(train_images.astype(np.float64).mean(0)).astype(np.int32)
            metrics["mean_image_fill_mae_255"] = float(np.abs(np.broadcast_to(mean_fill, original.shape) -
                                                              original)[unknown].mean())
            other = np.random.default_rng(seed).integers(0, len(train_images), (INPAINT_DRAWS, n))
            metrics["random_digit_fill_mae_255"] = float(np.mean([np.abs(train_images[o].astype(np.int32) -
                                                                         original)[unknown].mean() for o in other]))
        classifier = digits_classifier(run)
        if classifier is not None and y is not None:
            guesses = [classifier.logits(d).argmax(-1) for d in draws]
            metrics["classifier_keeps_label"] = float(np.mean([g == np.asarray(y) for g in guesses]))

        shown = min(n, GRID_IMAGES)
        known_row = np.where(np.asarray(mask[:shown]), data["uint8"][:shown], np.uint8(128))
        cells = np.concatenate([data["uint8"][:shown], known_row] + [d[:shown] for d in draws])
        title = [f"inpainting with BiFlow (1 NFE, w={w:g}): top half known, bottom half generated, seed {seed}",
                 f"{image_grids.shown_note(shown, n, 'the measured set')}; unknown-region MAE "
                 f"{metrics['unknown_mae_255']:.1f}/255" +
                 (f" (fill with the mean digit {metrics['mean_image_fill_mae_255']:.1f}, with a random digit "
                  f"{metrics['random_digit_fill_mae_255']:.1f})" if "mean_image_fill_mae_255" in metrics else "")]
        rows = ["original", "known (grey: unknown)"] + [f"inpainting {k + 1}" for k in range(INPAINT_DRAWS)]
        grid = image_grids.captioned_grid(cells, shown, title=title, row_labels=rows)
        path = output_dir(workdir, out_dir, "inpaint", w, seed, n)
        out = {"images": n, **write_outputs(run, path, "inpaint", grid, metrics,
                                            ("unknown_mae_255", "classifier_keeps_label"))}
    say_inpaint(out)
    return out


def run_class_edit(workdir: str, num_images: int = 100, seed: int = 0, out_dir: str | None = None,
                   w: float | None = None) -> dict[str, Any]:
    """Edit `num_images` test images into every class; grid, the classifier's verdict, paths."""
    with writing_into(workdir, "biflow"):
        run = runs.load_reverse(workdir)
        latent_space.require_pixel_space(run.config, "editing")
        flow = run.flow.model
        if not flow.num_classes:
            raise ConfigError("class editing needs a class-conditional model (model.num_classes > 0)")
        data = test_images(run, num_images, seed)
        n = len(data["labels"])
        encode, decode, w = bound_models(run, w)
        edited = np.zeros((n, flow.num_classes) + data["uint8"].shape[1:], np.uint8)
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            source = data["labels"][a:b]
            for target in range(flow.num_classes):
                images, _ = one_nfe.class_edit(encode, decode, data["encode"][a:b], source,
                                               jnp.full_like(source, target), patch_size=flow.patch_size)
                edited[a:b, target] = exact_inverse.images_to_uint8(images)
        labels = np.asarray(data["labels"])
        metrics: dict[str, Any] = {"num_images": n, "seed": seed, "w": w, "classes": flow.num_classes}
        classifier = digits_classifier(run)
        verdict = ""
        if classifier is not None:
            guesses = classifier.logits(edited.reshape((-1,) + edited.shape[2:])).argmax(-1).reshape(n, -1)
            targets = np.arange(flow.num_classes)[None]
            hit = guesses == targets
            other = targets != labels[:, None]
            metrics["target_accuracy"] = float(hit[other].mean())
            metrics["source_kept_accuracy"] = float(hit[~other].mean())
            metrics["per_target_accuracy"] = [float(hit[other[:, t], t].mean()) if other[:, t].any() else None
                                              for t in range(flow.num_classes)]
            metrics["originals_accuracy"] = float(np.mean(classifier.logits(data["uint8"]).argmax(-1) == labels))
            verdict = (f"; the digits classifier names the target class for {100 * metrics['target_accuracy']:.0f}% "
                       f"of edits to another class (chance 10%)")

        shown = min(n, GRID_IMAGES)
        cells = np.concatenate([data["uint8"][:shown, None], edited[:shown]], axis=1).reshape((-1,) + edited.shape[2:])
        title = [f"class editing with BiFlow (1 NFE, w={w:g}): G(F(x | source) | target), seed {seed}",
                 f"{image_grids.shown_note(shown, n, 'the measured set')}{verdict}"]
        grid = image_grids.captioned_grid(cells, flow.num_classes + 1, title=title,
                                    col_headers=["source"] + [f"to {t}" for t in range(flow.num_classes)],
                                    row_labels=[f"class {int(c)}" for c in labels[:shown]])
        path = output_dir(workdir, out_dir, "class_edit", w, seed, n)
        out = {"images": n, **write_outputs(run, path, "class_edit", grid, metrics,
                                            ("target_accuracy", "source_kept_accuracy"))}
    say_class_edit(out)
    return out


def say_inpaint(out: dict[str, Any]) -> None:
    """The console's account of an inpainting run: the generated half's error beside two blind fills."""
    m = out["metrics"]
    baselines = (f" (filling it with the mean training digit: {m['mean_image_fill_mae_255']:.1f}, with a "
                 f"random training digit: {m['random_digit_fill_mae_255']:.1f})"
                 if "mean_image_fill_mae_255" in m else "")
    kept = (f"; the digits classifier still names the source class for {m['classifier_keeps_label']:.3f}"
            if "classifier_keeps_label" in m else "")
    say(f"inpaint ({m['num_images']} test images x {m['draws_per_image']} draws, top half known): "
        f"unknown-region mean abs error {m['unknown_mae_255']:.1f}/255{baselines}{kept}; "
        f"known region changed by at most {m['known_max_abs_diff_255']}/255")
    say(f"inpaint: {out['grid']} (figures in {os.path.join(out['out_dir'], 'metrics.json')})")


def say_class_edit(out: dict[str, Any]) -> None:
    """The console's account of a class-editing run: how often the digits classifier names the target."""
    m = out["metrics"]
    if "target_accuracy" in m:
        say(f"class_edit ({m['num_images']} test images x {m['classes']} classes): the digits classifier "
            f"names the target class for {m['target_accuracy']:.3f} of edits to another class (chance 0.1), "
            f"the source class for {m['source_kept_accuracy']:.3f} of edits to the same class")
    say(f"class_edit: {out['grid']} (figures in {os.path.join(out['out_dir'], 'metrics.json')})")

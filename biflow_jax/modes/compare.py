"""Exact inverse against BiFlow on the same noise: side-by-side grids, speed and quality.

Both generators start from identical z; the exact inverse decodes token by token
(B x (T-1) sequential steps), BiFlow's G runs once (1 NFE; arXiv:2512.10953). Speed is
measured as throughput at the comparison's batch and as latency per image at batch 1
(`one_nfe.speed_note` says what a CPU ratio means). On the digits the quality is scored
by a small classifier trained on the real digits (biflow_jax.evaluators.digits_quality).
The exact inverse uses the sample mode's settings (config.sample: guidance, and the
denoising step when the flow learned Gaussian-noised images), so the two are compared as
each would be used. The captioned grid and the figures also go to the stage-2 run's
TensorBoard (`compare/...`)."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax import image_grids, latent_space, runs
from biflow_jax.modes import sample
from biflow_jax.samplers import exact_inverse, one_nfe

MAX_CLASSES = 10  # classes compared (all of the digits')


def timed(fn, *args) -> tuple[np.ndarray, float]:
    """Run once to compile, then time a second run; returns (output, seconds)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return np.asarray(out), time.perf_counter() - start


def latency_s(fn, *args, calls: int = 3) -> float:
    """Median seconds of `calls` calls of `fn(*args)` after one compiling call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def speed_lines(figures: dict[str, Any], backend: str) -> list[str]:
    """The console's 1-NFE speed report: throughput at the batch, latency at batch 1, what a ratio means."""
    return [f"speed: batch {figures['num_images']}: exact inverse {figures['exact_images_per_s']:.1f} images/s, "
            f"BiFlow 1-NFE {figures['biflow_images_per_s']:.1f} images/s ({figures['speedup']:.1f}x); batch 1: "
            f"exact inverse {figures['exact_ms_per_image_batch1']:.2f} ms/image, BiFlow 1-NFE "
            f"{figures['biflow_ms_per_image_batch1']:.2f} ms/image ({figures['speedup_batch1']:.1f}x) on {backend}",
            one_nfe.speed_note(backend)]


def side_by_side(left: np.ndarray, right: np.ndarray, per_row: int, gap: int = 1) -> tuple[np.ndarray, int]:
    """Rows of `per_row` left images, `gap` blank cells, then `per_row` right images."""
    rows = len(left) // per_row
    blank = np.zeros((gap,) + left.shape[1:], left.dtype)
    cells = [np.concatenate([left[r * per_row:(r + 1) * per_row], blank, right[r * per_row:(r + 1) * per_row]])
             for r in range(rows)]
    return np.concatenate(cells), 2 * per_row + gap


def compare(reverse_workdir: str, out_dir: str | None = None, per_class: int = 30, seed: int = 0,
            classifier_dir: str | None = None, grid_per_class: int = 10) -> dict[str, Any]:
    """Sample both models from the same noise; write grids and return speed and quality figures.

    `per_class` samples of each class are scored (the Frechet distance is biased upwards at
    small counts, so compare figures at equal counts); the grid shows `grid_per_class`.
    """
    with sample.writing_into(reverse_workdir, "biflow"):
        run = runs.load_reverse(reverse_workdir)
        config, reverse, rparams, flow, fparams = run.config, run.model, run.params, run.flow.model, run.flow.params
        reverse_workdir = run.workdir
        out_dir = out_dir or os.path.join(reverse_workdir, "samples")
        os.makedirs(out_dir, exist_ok=True)
        # At most MAX_CLASSES classes, spread over the label range: 30 images of each of ImageNet's 1000
        # classes would be 30,000 exact-inverse samples in one batch.
        k = min(max(flow.num_classes, 1), MAX_CLASSES)
        shown_classes = np.linspace(0, flow.num_classes - 1, k).round().astype(np.int32) if flow.num_classes else None
        labels = sample.placed(jnp.repeat(jnp.asarray(shown_classes), per_class) if flow.num_classes else None)
        n = k * per_class
        z = sample.placed(jax.random.normal(jax.random.key(seed), (n, flow.num_tokens, flow.token_dim)))
        settings = sample.sample_settings(config)
        guidance = sample.guidance_from_settings(settings)
        sigma = sample.denoise_sigma(run.flow.config, settings)
        w = sample.biflow_guidance(config, reverse, None)
        to_images = one_nfe.token_images(flow.patch_size, flow.img_size, flow.in_channels)

        # The samplers are jitted with the params as arguments: wrapping them in a jitted closure would fold
        # both models' weights into each executable as constants.
        def exact_fn(zz, yy):
            return exact_inverse.generate(flow, fparams, zz, yy, guidance, "cached", sigma)

        def biflow_fn(zz, yy):
            return one_nfe.one_nfe_sample(reverse, rparams, zz, yy, w, to_images=to_images)

        def biflow0_fn(zz):
            return one_nfe.one_nfe_sample(reverse, rparams, zz, labels, 0.0, to_images=to_images)

        exact, t_exact = timed(exact_fn, z, labels)
        biflow, t_biflow = timed(biflow_fn, z, labels)
        # Latency per image at batch 1 (one image, its own label): a few calls after one compile each.
        first = None if labels is None else labels[:1]
        exact_1 = latency_s(exact_fn, z[:1], first)
        biflow_1 = latency_s(biflow_fn, z[:1], first)
        biflow0 = np.asarray(biflow0_fn(z))
        decoder = latent_space.load_decoder(config)  # a latent run's samples are decoded through the frozen VAE
        to_uint8 = decoder.to_uint8 if decoder is not None else exact_inverse.images_to_uint8
        exact_u8, biflow_u8, biflow0_u8 = (to_uint8(v) for v in (exact, biflow, biflow0))

        cols = min(grid_per_class, per_class)
        shown = np.concatenate([np.arange(c * per_class, c * per_class + cols) for c in range(k)])
        cells, nrow = side_by_side(exact_u8[shown], biflow_u8[shown], cols)
        title = [f"exact inverse (left) vs BiFlow 1-NFE (right): the same noise and label in each position, "
                 f"checkpoint steps {run.flow.step} / {run.step}",
                 f"showing {cols} of {per_class} per class ({len(shown)} of {n} per model; all in exact_vs_biflow.npz)"]
        grid = image_grids.captioned_grid(
            cells, nrow, title=title,
            col_groups=[(sample.sampler_caption("exact", guidance.scale), cols), ("", 1),
                        (sample.sampler_caption("biflow", w), cols)],
            row_labels=[f"class {c}" for c in shown_classes] if flow.num_classes else None)
        grid_path = image_grids.save_png(grid, os.path.join(out_dir, "exact_vs_biflow.png"))
        np.savez(os.path.join(out_dir, "exact_vs_biflow.npz"), exact=exact_u8, biflow=biflow_u8,
                 labels=np.asarray(labels) if labels is not None else np.zeros(n, np.int32))
        results: dict[str, Any] = {
            "grid": grid_path, "num_images": n, "biflow_w": w, "exact_guidance": guidance.scale,
            "exact_images_per_s": n / t_exact, "biflow_images_per_s": n / t_biflow,
            "speedup": t_exact / t_biflow,
            "exact_ms_per_image_batch1": 1e3 * exact_1, "biflow_ms_per_image_batch1": 1e3 * biflow_1,
            "speedup_batch1": exact_1 / biflow_1,
            "exact_biflow_mean_abs_diff": float(np.mean(np.abs(exact - biflow))),
        }
        if config.data.name == "digits" and labels is not None:
            from biflow_jax.data.digits import digits_arrays
            from biflow_jax.evaluators import digits_quality

            classifier = digits_quality.load_or_train_classifier(classifier_dir or os.path.join(out_dir, "..",
                                                                                               "digits_classifier"))
            real_test = digits_arrays()["test"][0]
            intended = np.asarray(labels)
            for name, images in (("exact", exact_u8), ("biflow", biflow_u8), ("biflow_w0", biflow0_u8)):
                scores = digits_quality.evaluate_samples(classifier, images, intended, real_test)
                results[f"{name}_frechet"] = scores["frechet"]
                results[f"{name}_label_accuracy"] = scores["label_accuracy"]
        image_grids.to_tensorboard(reverse_workdir, run.step, images={"compare/exact_vs_biflow": grid},
                             scalars={f"compare/{key}": value for key, value in results.items()
                                      if isinstance(value, float)})
        return results

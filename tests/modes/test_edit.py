"""Editing and the comparison on a two-stage job dir: known pixels kept, figures measured, grids captioned."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from tiny_job import make_job_dir

from biflow_jax import image_grids
from biflow_jax.modes import compare, edit


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("job"))
    make_job_dir(workdir)
    return workdir


def caption_band(png: str, body_rows: int, cell: int) -> np.ndarray:
    """The grid's caption band, checked to be whole text lines above `body_rows` rows of `cell` px cells."""
    with Image.open(png) as f:
        grid = np.asarray(f)
    top = grid.shape[0] - (body_rows * (cell + 2) + 2)
    assert top > image_grids.LINE and (top - 2) % image_grids.LINE == 0, (grid.shape, top)
    assert (grid[:top] == 255).sum() > 100  # text
    return grid


def test_inpainting_keeps_the_known_half_exactly_and_measures_the_rest(job_dir, monkeypatch):
    kept = []
    real = edit.one_nfe.inpaint

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        kept.append((np.asarray(args[2]), np.asarray(args[3]), np.asarray(result.images),
                     np.asarray(result.generated)))
        return result

    monkeypatch.setattr(edit.one_nfe, "inpaint", spy)
    out = edit.run_inpaint(job_dir, num_images=12, seed=3)
    assert out["out_dir"] == os.path.join(job_dir, "samples", "inpaint_w1_seed3_n12")
    for x, mask, images, generated in kept:
        np.testing.assert_array_equal(images[mask], x[mask])  # the known region is the original, exactly
        np.testing.assert_array_equal(images[~mask], generated[~mask])
        assert np.abs(generated[mask] - x[mask]).max() > 0  # untrained G: pasting did something
    m = out["metrics"]
    assert m["known_max_abs_diff_255"] == 0 and m["num_images"] == 12 and m["draws_per_image"] == 3
    assert 0 < m["unknown_mae_255"] <= 255 and 0 < m["mean_image_fill_mae_255"] < m["random_digit_fill_mae_255"] < 255
    with open(os.path.join(out["out_dir"], "metrics.json")) as f:
        assert json.load(f)["unknown_mae_255"] == m["unknown_mae_255"]
    # Rows: original, known, 3 inpaintings; 10 of the 12 images shown, 8x8 enlarged 4x.
    grid = caption_band(out["grid"], 5, 32)
    assert grid.shape[1] >= 10 * 34 + 2


def test_class_editing_reports_the_classifier_verdict(job_dir):
    out = edit.run_class_edit(job_dir, num_images=4, seed=0)
    m = out["metrics"]
    assert m["num_images"] == 4 and m["classes"] == 10
    assert 0 <= m["target_accuracy"] <= 1 and 0 <= m["source_kept_accuracy"] <= 1
    assert m["originals_accuracy"] > 0.5  # the classifier itself reads real test digits
    # Rows: 4 test images; columns: source + 10 targets, cells widened to 40 px for "source".
    grid = caption_band(out["grid"], 4, 40)
    left = len("class 0") * image_grids.CHAR + image_grids.TEXT_GAP + 2
    assert grid.shape[1] == left + 11 * 42 + 2


def test_comparison_grid_names_both_models(job_dir):
    figures = compare.compare(os.path.join(job_dir, "reverse"), per_class=2, grid_per_class=2)
    # 10 class rows of 2 exact + 1 gap + 2 BiFlow cells, under title and group-header lines.
    grid = caption_band(figures["grid"], 10, 32)
    assert grid.shape[1] >= 5 * 34 + 2
    assert figures["biflow_w"] == 1.0 and figures["exact_guidance"] == 0.0
    assert 0 <= figures["biflow_label_accuracy"] <= 1
    # Speed: throughput at the batch and latency at batch 1, both models, each ratio of its own pair.
    assert figures["num_images"] == 20
    assert figures["speedup"] == pytest.approx(figures["biflow_images_per_s"] / figures["exact_images_per_s"],
                                               rel=1e-12)
    assert figures["speedup_batch1"] == pytest.approx(
        figures["exact_ms_per_image_batch1"] / figures["biflow_ms_per_image_batch1"], rel=1e-12)
    line, note = compare.speed_lines(figures, "cpu")
    assert line.startswith("speed: batch 20: exact inverse ") and "BiFlow 1-NFE" in line
    assert f"exact inverse {figures['exact_ms_per_image_batch1']:.2f} ms/image" in line
    assert f"BiFlow 1-NFE {figures['biflow_ms_per_image_batch1']:.2f} ms/image" in line
    assert "compute-bound" in note and "accelerator" in note
    assert "compute-bound" not in compare.speed_lines(figures, "tpu")[1]

"""`--mode=sample` on a two-stage job dir: both samplers, one new folder per setting, captioned grids."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from tiny_job import make_job_dir

from biflow_jax import image_grids
from biflow_jax.errors import ConfigError
from biflow_jax.modes import sample


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("job"))
    make_job_dir(workdir)
    return workdir


def check_class_grid(png: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Size of a row-per-class grid, its caption band, and each row's first image in place."""
    classes = np.unique(labels)
    cols = min(sample.MAX_GRID_COLUMNS, max(int(np.sum(labels == c)) for c in classes))
    left = len("class 0") * image_grids.CHAR + image_grids.TEXT_GAP + 2
    cell = 32 + 2  # 8x8 enlarged 4x, 2-pixel padding
    with Image.open(png) as f:
        grid = np.asarray(f)
    top = grid.shape[0] - (len(classes) * cell + 2)
    assert top > image_grids.LINE and (top - 2) % image_grids.LINE == 0  # a caption band of whole text lines
    assert grid.shape[1] >= left + cols * cell + 2
    assert (grid[:top] == 255).sum() > 100  # text in the band
    for r, c in enumerate(classes):
        first = images[labels == c][0]
        y0, x0 = top + 2 + r * cell, left + 2
        np.testing.assert_array_equal(grid[y0:y0 + 32, x0:x0 + 32], first[..., 0].repeat(4, 0).repeat(4, 1))


def test_both_samplers_on_a_job_dir_and_a_second_seed_writes_a_second_folder(job_dir):
    biflow = sample.run_sample(job_dir, sampler="biflow", w=1.0)
    assert biflow["out_dir"] == os.path.join(job_dir, "samples", "biflow_w1_seed0_n20")
    exact = sample.run_sample(job_dir, sampler="exact")
    assert exact["out_dir"] == os.path.join(job_dir, "samples", "exact_w0_seed0_n20")
    saved = {}
    for out in (biflow, exact):
        data = np.load(out["samples_npz"])
        assert data["images"].shape == (20, 8, 8, 1) and data["images"].std() > 0
        np.testing.assert_array_equal(data["labels"], np.arange(20) % 10)
        check_class_grid(out["samples_png"], data["images"], data["labels"])
        saved[out["sampler"]] = data["images"]
        with open(os.path.join(out["out_dir"], "settings.json")) as f:
            assert json.load(f)["sampler"] == out["sampler"]
    assert np.abs(saved["biflow"].astype(int) - saved["exact"].astype(int)).mean() > 1  # two models, not one
    # The same settings again give the same images: the noise is a function of the seed alone.
    before = {name: open(os.path.join(biflow["out_dir"], name), "rb").read() for name in os.listdir(biflow["out_dir"])}
    other = sample.run_sample(job_dir, sampler="biflow", w=1.0, seed=1)
    assert other["out_dir"] == os.path.join(job_dir, "samples", "biflow_w1_seed1_n20")
    assert not np.array_equal(np.load(other["samples_npz"])["images"], saved["biflow"])
    after = {name: open(os.path.join(biflow["out_dir"], name), "rb").read() for name in os.listdir(biflow["out_dir"])}
    assert after == before  # the first folder is untouched
    # The stage dirs' own training artefacts are never written by the mode.
    assert not os.path.exists(os.path.join(job_dir, "forward", "samples"))
    assert not os.path.exists(os.path.join(job_dir, "reverse", "samples"))


def test_guidance_needs_a_g_trained_for_it_and_biflow_needs_a_stage_2_run(job_dir, tmp_path):
    import ml_collections

    from biflow_jax import runs

    run = runs.load_reverse(job_dir)
    untrained = ml_collections.ConfigDict(run.config.to_dict())
    untrained.biflow.cfg_training = False
    with pytest.raises(ConfigError, match="without guidance"):
        sample.biflow_guidance(untrained, run.model, 1.0)
    assert sample.biflow_guidance(untrained, run.model, None) == 0.0
    assert sample.biflow_guidance(run.config, run.model, None) == run.config.biflow.guidance
    with pytest.raises(FileNotFoundError, match="--sampler=biflow"):
        sample.run_sample(os.path.join(job_dir, "forward"), sampler="biflow")
    with pytest.raises(ConfigError, match="--sampler"):
        sample.run_sample(job_dir, sampler="ddim")
    with pytest.raises(ConfigError, match="--num_images=0"):
        sample.run_sample(job_dir, sampler="biflow", num_images=0)

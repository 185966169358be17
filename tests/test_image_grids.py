"""Captioned grids: layout arithmetic, images placed exactly, text drawn in the caption band."""

import numpy as np
import pytest

from biflow_jax import image_grids


def digits(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def test_layout_places_enlarged_images_under_a_caption_band():
    images = digits(6)
    grid = image_grids.captioned_grid(images, 3, title="two rows", row_labels=["class 0", "class 1"])
    left = 7 * image_grids.CHAR + image_grids.TEXT_GAP + 2  # "class 0" plus the gap
    top = image_grids.LINE + 2
    cell = 32 + 2  # 8x8 enlarged 4x, 2-pixel padding
    assert grid.shape == (top + 2 * cell + 2, left + 3 * cell + 2, 1)
    for k, image in enumerate(images):
        r, c = divmod(k, 3)
        y0, x0 = top + 2 + r * cell, left + 2 + c * cell
        np.testing.assert_array_equal(grid[y0:y0 + 32, x0:x0 + 32], image.repeat(4, 0).repeat(4, 1))
    band = grid[:top]
    assert (band == 255).sum() > 20  # the title's white text
    assert (grid[top:, :left - image_grids.TEXT_GAP] == 255).sum() > 20  # the row labels


def test_headers_widen_cells_and_groups_must_cover_the_columns():
    headers = ["source"] + [f"to {k}" for k in range(10)]
    grid = image_grids.captioned_grid(digits(22), 11, col_headers=headers, title="class editing")
    cell = grid.shape[1] // 11
    assert cell * 11 <= grid.shape[1] and 6 * image_grids.CHAR <= cell  # "source" fits above its column
    assert grid.shape[0] == 2 * image_grids.LINE + 2 + 2 * (40 + 2) + 2  # 8x8 enlarged 5x = 40 px for the text
    with pytest.raises(ValueError, match="span"):
        image_grids.captioned_grid(digits(4), 4, col_groups=[("a", 2), ("b", 1)])
    with pytest.raises(ValueError, match="row labels"):
        image_grids.captioned_grid(digits(4), 2, row_labels=["one"])


def test_a_narrow_grid_is_widened_for_its_title_and_wrapped_beyond():
    grid = image_grids.captioned_grid(digits(2), 2, title="x" * 20)
    assert grid.shape[1] == 20 * image_grids.CHAR + 4
    long = image_grids.captioned_grid(digits(2), 2, title="word " * 200)
    assert long.shape[1] == image_grids.TITLE_WIDTH and long.shape[0] > 10 * image_grids.LINE


def test_class_rows_and_the_shown_note():
    labels = np.array([0, 1, 1, 1, 2])
    cells, cols, classes = image_grids.class_rows(digits(5), labels, max_cols=2)
    assert cols == 2 and list(classes) == [0, 1, 2] and len(cells) == 6
    assert not cells[1].any()  # class 0 has one image: a blank cell
    assert image_grids.shown_note(5, 5, "x") == "all 5 images"
    assert image_grids.shown_note(4, 5, "samples.npz") == "showing 4 of 5 images (all in samples.npz)"


def test_tensorboard_holds_the_image_and_the_scalars(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    grid = image_grids.captioned_grid(digits(4), 2, title="t")
    image_grids.to_tensorboard(str(tmp_path), 7, images={"samples/x": grid}, scalars={"inpaint/mae": 3.5})
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "samples/x" in tags and "inpaint/mae" in tags
    assert acc.Tensors("inpaint/mae")[0].step == 7

"""Image grids a person can read without the source: captions drawn into the PNG, and TensorBoard.

Every grid the project writes goes through `captioned_grid`: a title band (what the
images are, how many of how many are shown), optional group headers spanning blocks of
columns (e.g. "exact inverse, g=0" | "BiFlow 1-NFE, w=1"), optional per-column headers
("source", "to 3") and row labels down the left ("class 7"). Text uses PIL's built-in
bitmap font, so no font file is needed; small images (8x8 digits) are enlarged by an
integer factor until the headers fit above their column.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LINE = 13  # pixels per caption line (the bitmap font is 11 px tall)
CHAR = 6  # pixels per character of the bitmap font
TEXT_GAP = 4  # pixels between a row label and the images
MIN_CELL = 32  # images smaller than this are enlarged (nearest neighbour) to at least this
TITLE_WIDTH = 480  # a grid narrower than its title is widened up to this many pixels


def text_width(text: str) -> int:
    return CHAR * len(text)


def wrap(text: str, width_px: int) -> list[str]:
    """Greedy word wrap of `text` to lines at most `width_px` wide (one word may overflow)."""
    limit = max(1, width_px // CHAR)
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if len(candidate) <= limit or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines


def enlarge(images: np.ndarray, min_size: int) -> np.ndarray:
    """Repeat pixels by the smallest integer factor that makes the images at least `min_size` wide."""
    if images.shape[2] >= min_size:
        return images
    factor = -(-min_size // images.shape[2])
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def captioned_grid(images: np.ndarray, ncols: int, *, title: str | Sequence[str] = (),
                   col_headers: Sequence[str] | None = None, col_groups: Sequence[tuple[str, int]] = (),
                   row_labels: Sequence[str] | None = None, padding: int = 2, min_size: int = MIN_CELL) -> np.ndarray:
    """Tile uint8 NHWC images `ncols` per row (row-major; missing cells black) under captions.

    title: a string or a list of them, each wrapped to the grid's width.
    col_groups: (text, number of columns) pairs, left to right, centred over their columns.
    col_headers: one short text per column; row_labels: one per row.
    Returns an (H, W, C) uint8 array, C as the images (1 or 3); text is white on black.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"grids want uint8 NHWC images with 1 or 3 channels, got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError("a grid needs at least one image")
    ncols = max(1, min(int(ncols), len(images))) if col_headers is None else int(ncols)
    nrows = math.ceil(len(images) / ncols)
    if col_headers is not None and len(col_headers) != ncols:
        raise ValueError(f"{len(col_headers)} column headers for {ncols} columns")
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"{len(row_labels)} row labels for {nrows} rows")
    if col_groups and sum(span for _, span in col_groups) != ncols:
        raise ValueError(f"column groups span {sum(s for _, s in col_groups)} columns, the grid has {ncols}")
    widest_header = max((text_width(t) for t in col_headers or ()), default=0)
    images = enlarge(images, max(min_size, widest_header + 2 - padding))
    _, h, w, c = images.shape
    body_w = ncols * (w + padding) + padding
    left = max((text_width(t) for t in row_labels or ()), default=0)
    left = left + TEXT_GAP + 2 if left else 0
    titles = [title] if isinstance(title, str) else list(title)
    # A narrow grid gets a wider canvas (up to TITLE_WIDTH), so its title is not a column of words.
    width = max(left + body_w, min(max((text_width(t) + 4 for t in titles), default=0), TITLE_WIDTH))
    title_lines = [line for text in titles for line in wrap(text, width - 4)]
    header_lines = len(title_lines) + bool(col_groups) + (col_headers is not None)
    top = header_lines * LINE + (2 if header_lines else 0)
    height = top + nrows * (h + padding) + padding

    canvas = np.zeros((height, width, c), np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, ncols)
        y0, x0 = top + padding + r * (h + padding), left + padding + col * (w + padding)
        canvas[y0:y0 + h, x0:x0 + w] = image
    picture = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default_imagefont()
    white = 255 if c == 1 else (255, 255, 255)
    y = 1
    for line in title_lines:
        draw.text((2, y), line, fill=white, font=font)
        y += LINE
    if col_groups:
        first = 0
        for text, span in col_groups:
            x0 = left + padding + first * (w + padding)
            span_w = span * (w + padding) - padding
            shown = text if text_width(text) <= span_w + padding else text[: max(1, (span_w + padding) // CHAR)]
            draw.text((x0 + max(0, (span_w - text_width(shown)) // 2), y), shown, fill=white, font=font)
            first += span
        y += LINE
    if col_headers is not None:
        for col, text in enumerate(col_headers):
            x0 = left + padding + col * (w + padding)
            draw.text((x0 + max(0, (w - text_width(text)) // 2), y), text, fill=white, font=font)
    for r, text in enumerate(row_labels or ()):
        y0 = top + padding + r * (h + padding) + max(0, (h - LINE) // 2)
        draw.text((left - TEXT_GAP - text_width(text), y0), text, fill=white, font=font)
    out = np.asarray(picture)
    return out[..., None] if c == 1 else out


def save_png(grid: np.ndarray, path: str) -> str:
    """Write an (H, W, 1|3) uint8 grid as a PNG (grayscale for one channel); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def class_rows(images: np.ndarray, labels: np.ndarray, max_cols: int = 16) -> tuple[np.ndarray, int, np.ndarray]:
    """One row per label (sorted), blank cells where a class has fewer images.

    Returns (cells, columns, classes): cells holds len(classes) * columns images.
    """
    classes = np.unique(labels)
    cols = min(max_cols, max(int(np.sum(labels == c)) for c in classes))
    cells = np.zeros((len(classes) * cols,) + images.shape[1:], images.dtype)
    for r, c in enumerate(classes):
        chosen = images[labels == c][:cols]
        cells[r * cols:r * cols + len(chosen)] = chosen
    return cells, cols, classes


def shown_note(shown: int, total: int, where: str) -> str:
    """'all 100 images' or 'showing 160 of 1000 images (all in samples.npz)'."""
    if shown >= total:
        return f"all {total} images"
    return f"showing {shown} of {total} images (all in {where})"


def to_tensorboard(logdir: str, step: int, images: Mapping[str, np.ndarray] | None = None,
                   scalars: Mapping[str, float] | None = None) -> None:
    """Add image summaries (H, W, C uint8 grids) and scalars to the TensorBoard events in `logdir`.

    A new events file beside the training run's own, so TensorBoard shows the grids and
    figures with the run's curves. Only process 0 writes.
    """
    from clu import metric_writers

    from biflow_jax.console import is_main_process

    if not is_main_process():
        return
    writer = metric_writers.SummaryWriter(logdir)
    try:
        if images:
            writer.write_images(step, {k: np.asarray(v)[None] for k, v in images.items()})
        if scalars:
            writer.write_scalars(step, {k: float(v) for k, v in scalars.items() if v is not None})
        writer.flush()
    finally:
        writer.close()

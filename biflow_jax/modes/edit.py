"""Training-free editing with a trained BiFlow, on test-split images: grids a person can look at.

inpaint: keep the top half of each image (its noise from F), draw the rest of z anew, G(z').
class_edit: z = F(x | y), then G(z | y') for every class y'.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax import likelihood, runs
from biflow_jax.data import input_pipeline
from biflow_jax.modes.sample import save_grid
from biflow_jax.samplers import exact_inverse, one_nfe


def test_images(config: Any, count: int) -> tuple[jax.Array, jax.Array]:
    batch = next(input_pipeline.eval_batches(config.data, max(count, 1)))
    return likelihood.to_unit_range(jnp.asarray(batch["image"][:count])), jnp.asarray(batch["label"][:count])


def run_inpaint(workdir: str, count: int = 10, seed: int = 0, out_dir: str | None = None) -> dict[str, Any]:
    """Rows: original, the known top half, three inpaintings with different noise."""
    run = runs.load_reverse(workdir)
    config, reverse, params, flow, flow_params = run.config, run.model, run.params, run.flow.model, run.flow.params
    x, y = test_images(config, count)
    y = y if flow.num_classes else None
    encode = one_nfe.flow_encoder(flow, flow_params)
    decode = one_nfe.reverse_decoder(reverse, params, float(config.biflow.guidance)
                                     if config.biflow.cfg_training else None)
    mask = jnp.zeros(x.shape, bool).at[:, : x.shape[1] // 2].set(True)
    rows = [x, jnp.where(mask, x, -1.0)]
    for k in range(3):
        result = one_nfe.inpaint(encode, decode, x, mask, y, jax.random.key(seed + k), patch_size=flow.patch_size)
        rows.append(result.images)
    grid = np.concatenate([exact_inverse.images_to_uint8(r) for r in rows])
    path = os.path.join(out_dir or os.path.join(run.workdir, "samples"), "inpaint.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_grid(grid, path, count)
    return {"grid": path, "images": count}


def run_class_edit(workdir: str, count: int = 8, out_dir: str | None = None) -> dict[str, Any]:
    """Row per test image: the original, then G(F(x | y) | y') for y' = 0..K-1."""
    run = runs.load_reverse(workdir)
    config, reverse, params, flow, flow_params = run.config, run.model, run.params, run.flow.model, run.flow.params
    if not flow.num_classes:
        raise ValueError("class editing needs a class-conditional model")
    x, y = test_images(config, count)
    encode = one_nfe.flow_encoder(flow, flow_params)
    decode = one_nfe.reverse_decoder(reverse, params, float(config.biflow.guidance)
                                     if config.biflow.cfg_training else None)
    cells = [x[:, None]]
    for target in range(flow.num_classes):
        images, _ = one_nfe.class_edit(encode, decode, x, y, jnp.full_like(y, target), patch_size=flow.patch_size)
        cells.append(images[:, None])
    grid = exact_inverse.images_to_uint8(jnp.concatenate(cells, axis=1).reshape((-1,) + x.shape[1:]))
    path = os.path.join(out_dir or os.path.join(run.workdir, "samples"), "class_edit.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_grid(grid, path, flow.num_classes + 1)
    return {"grid": path, "images": count}

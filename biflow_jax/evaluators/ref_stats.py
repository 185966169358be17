"""A reference batch from a dataset (the command: `python -m biflow_jax.cli.ref_stats --config=... --out=F.npz`).

Writes the format of ADM's reference batches (Dhariwal & Nichol 2021, arXiv:2105.05233):
`mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (sFID's spatial features) over every image of
the split, and `arr_0`, the first `--num_images` images (uint8 NHWC, 10,000 by default, as
ADM's VIRTUAL_* files hold), from which precision/recall's reference features are computed
when scoring, as ADM's evaluator does. One extra key, `biflow_meta` (JSON), records the
Inception features used (FID or random weights, resize convention, input size), so a
sample set is never scored in another feature space, and the image resize (`resize`: ADM's
centre crop, `data.adm_resize`, the same function training reads through). Any dataset
`config.data` reads works (`data/input_pipeline.eval_batches`); each process reads its own shard.

Inception settings come from the config's `evals.fid` section (`inception` weights path,
`convention`, `inception_size`, `batch_size`); `--inception`, `--random_inception` override.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from biflow_jax import sharding
from biflow_jax.console import is_main_process, say
from biflow_jax.errors import ConfigError, DataError

RESIZE = "adm_center_crop"  # data.adm_resize: box halving, bicubic, centre square (guided-diffusion)


def compute(config: Any, out: str, split: str | None = None, num_images: int = 10_000, inception: str | None = None,
            random_inception: bool = False) -> dict:
    """Write the reference batch of `config.data`'s split to `out`; returns what was written (no arrays)."""
    from biflow_jax.data import input_pipeline
    from biflow_jax.evaluators import fid, sample_fid

    settings = sample_fid.fid_settings(config, "flow")
    if inception:
        settings["inception"] = inception
    if random_inception:
        settings["random_inception"] = True
    if not out:
        raise ConfigError("--out=FILE.npz is required")
    if os.path.dirname(os.path.abspath(out)) and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise FileNotFoundError(f"--out={out}: folder {os.path.dirname(out)} does not exist")
    split = split or config.data.train_split
    sizes = input_pipeline.dataset_info(config.data)["num_examples"]
    if split not in sizes:
        raise DataError(f"split {split!r} not in dataset {config.data.name!r} (has {sorted(sizes)})")
    size = sizes[split]
    mesh = sharding.make_mesh()
    extractor = sample_fid.make_extractor(settings, mesh)
    if extractor.random:
        say(f"NOTE: {extractor.weights}")
    kept: list[np.ndarray] = []

    def keep(batch):
        have = sum(len(k) for k in kept)
        if have < num_images:
            images = np.asarray(multihost_utils.process_allgather(batch["image"], tiled=True))
            mask = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True))
            kept.append(images[mask][:num_images - have])

    batches = input_pipeline.eval_batches(config.data, int(settings["batch_size"]), split)
    features = extractor.of_batches(batches, total=size, desc=f"Inception ({config.data.name}:{split})",
                                    on_batch=keep if num_images > 0 else None)
    mu, sigma = fid.feature_statistics(features["pool"])
    mu_s, sigma_s = fid.feature_statistics(features["spatial"])
    meta = {**sample_fid.extractor_meta(extractor), "dataset": config.data.name, "split": split,
            "image_size": int(config.data.image_size), "resize": RESIZE, "num_statistics": int(len(features["pool"])),
            "num_images": int(sum(len(k) for k in kept)), "weights": extractor.weights}
    if is_main_process():
        tmp = f"{out}.tmp.{os.getpid()}"
        images = np.concatenate(kept) if kept else None
        fid.write_reference_batch(tmp, mu, sigma, mu_s, sigma_s, images=images,
                                  extra={sample_fid.META_KEY: np.asarray(json.dumps(meta))})
        os.replace(tmp, out)
    multihost_utils.sync_global_devices("reference batch written")
    say(f"reference batch {out}: statistics of {meta['num_statistics']:,} {config.data.name} {split} images, "
        f"{meta['num_images']:,} images in arr_0; {extractor.describe()}")
    return meta

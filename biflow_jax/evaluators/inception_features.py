"""Inception features of many images, batched, jitted and sharded over every device and process.

One loop serves the reference statistics (a dataset split, `of_batches`), the scoring of a
sample file (`of_array`) and the FID evaluator during training (`of_global`): each global
batch is split over the mesh, padded rows are masked out, and every process gathers the
whole batch's features (as `evaluators.common.masked_mean` does), so the features, and
FID (Heusel et al. 2017, arXiv:1706.08500), are the same on 1 device or a pod.

Weights are pytorch-fid's FID Inception (`interop.inception_weights`), or, for tests and
the 8x8 digits only, deterministic random He-initialised weights: a random network gives
a feature space, not *the* FID one, and every output that uses it says so.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from biflow_jax import sharding
from biflow_jax.errors import ConfigError
from biflow_jax.interop.inception_weights import WEIGHTS_FILE, load_inception
from biflow_jax.models.inception import (
    INCEPTION_SIZE,
    InceptionV3,
    parameter_shapes,
    resize_for_inception,
    scale_for_inception,
)

FEATURES = ("pool", "spatial", "is_logits")
RANDOM_SEED = 0
RANDOM_WARNING = ("RANDOM Inception weights (He init, seed 0), not the FID network: the figures are for tests and "
                  "the digits only and compare with no paper or other tool")


def random_variables(seed: int = RANDOM_SEED) -> dict[str, Any]:
    """He-normal kernels, identity BatchNorm and zero biases, drawn with numpy from `seed`.

    Deterministic across machines and JAX versions, so reference statistics and samples scored
    in different processes share one (arbitrary) feature space.
    """
    rng = np.random.default_rng(seed)
    variables: dict[str, Any] = {}
    for collection, shapes in parameter_shapes().items():
        for path, shape in sorted(shapes.items()):
            *parents, leaf = path.split("/")
            if leaf == "kernel":
                value = rng.standard_normal(shape) * math.sqrt(2.0 / math.prod(shape[:-1]))
            elif leaf in ("scale", "var"):
                value = np.ones(shape)
            else:
                value = np.zeros(shape)
            node = variables.setdefault(collection, {})
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = np.asarray(value, np.float32)
    return variables


def load_variables(path: str, random_weights: bool) -> tuple[dict[str, Any], str]:
    """(variables, a description of the weights for every report). An empty path is an error
    naming the file FID needs, unless `random_weights` asks for the test network."""
    if random_weights:
        return random_variables(), RANDOM_WARNING
    if not path:
        raise ConfigError(f"FID needs pytorch-fid's Inception weights {WEIGHTS_FILE} (a local file; set "
                          "evals.fid.inception=PATH or --inception=PATH; --random_inception for tests/digits only)")
    return load_inception(path), f"FID Inception weights {path}"


def _as_rgb_float(images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


@partial(jax.jit, static_argnames=("size", "convention"))
def _features(variables: Any, images: jax.Array, *, size: int, convention: str) -> dict[str, jax.Array]:
    x = scale_for_inception(resize_for_inception(_as_rgb_float(images), size, convention), convention)
    out = InceptionV3().apply(variables, x)
    return {"pool": out.pool, "spatial": out.spatial, "is_logits": out.is_logits}


def show_progress() -> bool:
    """Progress bars only for a person: process 0 writing to a terminal."""
    return jax.process_index() == 0 and sys.stdout.isatty()


class InceptionExtractor:
    """uint8 NHWC images (1 or 3 channels, any size) -> pool, spatial (sFID) and IS-logit features.

    `size` is the side the images are resized to (299 for FID; tests use ~80 px with random
    weights); `convention` the resize and scaling ('adm' or 'pytorch_fid', see
    `models.inception`). `batch_size` is global and a multiple of the device count.
    """

    def __init__(self, variables: Any, weights: str, mesh: Mesh, batch_size: int, convention: str = "adm",
                 size: int = INCEPTION_SIZE):
        devices = mesh.devices.size
        if batch_size % devices or batch_size % jax.process_count():
            raise ConfigError(f"evals.fid.batch_size={batch_size} must be a multiple of the device count {devices}")
        if size < 75:
            raise ConfigError(f"evals.fid.inception_size={size}: Inception-v3 needs at least 75 px")
        self.mesh, self.batch_size, self.convention, self.size, self.weights = (mesh, batch_size, convention, size,
                                                                                weights)
        self.random = weights == RANDOM_WARNING
        self.batch_sharding = NamedSharding(mesh, P(sharding.AXIS))
        self.variables = jax.device_put(variables, NamedSharding(mesh, P()))

    def describe(self) -> str:
        return f"{self.weights}; {self.convention} resize to {self.size} px"

    def of_global(self, images: jax.Array, mask: jax.Array | np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Features of a global (sharded) batch, gathered on every process; masked rows dropped."""
        out = _features(self.variables, images, size=self.size, convention=self.convention)
        gathered = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in out.items()}
        if mask is None:
            return gathered
        keep = np.asarray(multihost_utils.process_allgather(mask, tiled=True)) if isinstance(mask, jax.Array) \
            else np.asarray(mask)
        return {k: v[keep] for k, v in gathered.items()}

    def of_batches(self, batches: Iterable[dict[str, np.ndarray]], total: int | None = None,
                   desc: str = "Inception", on_batch: Callable[[dict[str, np.ndarray]], None] | None = None
                   ) -> dict[str, np.ndarray]:
        """Features of this process's local batches (`image`, `mask`; global size batch_size).

        `on_batch` sees every gathered global batch (with its masked images) — ref_stats
        keeps reference images through it.
        """
        parts: dict[str, list[np.ndarray]] = {k: [] for k in FEATURES}
        with tqdm(total=total, desc=desc, unit="img", disable=not show_progress()) as bar:
            for batch in batches:
                g = sharding.to_global({"image": batch["image"], "mask": batch["mask"]}, self.batch_sharding)
                features = self.of_global(g["image"], g["mask"])
                for k in FEATURES:
                    parts[k].append(features[k])
                if on_batch is not None:
                    on_batch({"image": g["image"], "mask": g["mask"]})
                bar.update(len(features["pool"]))
        if not parts["pool"]:
            raise ValueError("no images to compute Inception features of")
        return {k: np.concatenate(v) for k, v in parts.items()}

    def of_array(self, images: np.ndarray, desc: str = "Inception") -> dict[str, np.ndarray]:
        """Features of all `images` (the same array on every process, e.g. an npz), in their order."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"expected uint8 NHWC images with 1 or 3 channels, got {images.dtype} {images.shape}")
        return self.of_batches(local_batches(images, self.batch_size), total=len(images), desc=desc)


def local_batches(images: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of each global batch of `images` (held whole by every process), padded."""
    local = batch_size // jax.process_count()
    first = jax.process_index() * local
    for start in range(0, len(images), batch_size):
        rows = images[start + first:min(start + first + local, len(images))]
        mask = np.zeros(local, bool)
        mask[:len(rows)] = True
        padded = np.zeros((local,) + images.shape[1:], images.dtype)
        padded[:len(rows)] = rows
        yield {"image": padded, "mask": mask}

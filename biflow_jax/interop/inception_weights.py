"""pytorch-fid's FID Inception weights (``pt_inception-2015-12-05-6726825d.pth``) as Flax variables.

That file is the 2015-12-05 TF Inception graph ported to torchvision's ``Inception3`` layout
(FID: Heusel et al. 2017, arXiv:1706.08500; used by ADM, Dhariwal & Nichol 2021,
arXiv:2105.05233). Nothing is downloaded: the caller passes a local copy. The conversion is a
flat rename plus layout changes (conv OIHW -> HWIO, fc (out, in) -> (in, out)). BatchNorm
running statistics are kept, not folded into the convolutions, in the ``batch_stats``
collection (``mean``/``var``), so the converted tree mirrors the torch one tensor for tensor.
``num_batches_tracked`` counters are ignored when present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from biflow_jax.interop.state_dicts import check_keys, nest, read_torch_file
from biflow_jax.models.inception import parameter_shapes

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
_NEEDED = (f"pytorch-fid's FID Inception weights file {WEIGHTS_FILE} (the TF 2015-12-05 Inception ported "
           "by mseitzer/pytorch-fid, released as 'fid_weights'); download it elsewhere and pass its local path")

# Flax leaf name -> torch leaf name, per collection.
_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _torch_layout(flax_path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if flax_path.endswith("conv/kernel"):  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if flax_path == "fc/kernel":  # (in, out) -> (out, in)
        return (shape[1], shape[0])
    return shape


def _from_torch(flax_path: str, value: np.ndarray) -> np.ndarray:
    if flax_path.endswith("conv/kernel"):
        value = value.transpose(2, 3, 1, 0)
    elif flax_path == "fc/kernel":
        value = value.T
    return np.ascontiguousarray(value, dtype=np.float32)


def torch_names() -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """torch state_dict key -> (collection, Flax path, torch shape) for every InceptionV3 tensor.

    Shapes come from the Flax module itself (``jax.eval_shape``, nothing allocated), so the
    architecture is written down once.
    """
    names: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for collection, shapes in parameter_shapes().items():
        for path, shape in shapes.items():
            *parents, leaf = path.split("/")
            key = ".".join([*parents, _LEAVES[(collection, leaf)]])
            names[key] = (collection, path, _torch_layout(path, tuple(shape)))
    return names


def load_inception(path: Path | str) -> dict[str, Any]:
    """Flax variables ``{'params': ..., 'batch_stats': ...}`` for ``InceptionV3().apply``.

    FileNotFoundError when the file is absent (naming the file needed); ValueError naming
    every missing, unexpected or wrongly shaped key, with both shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights not found: {path} (needed: {_NEEDED})")
    state = {k: v for k, v in read_torch_file(path).items() if not k.endswith("num_batches_tracked")}
    names = torch_names()
    check_keys(state, {k: shape for k, (_, _, shape) in names.items()}, f"{path} (FID Inception-v3)")
    flat: dict[str, dict[str, np.ndarray]] = {"params": {}, "batch_stats": {}}
    for key, (collection, flax_path, _) in names.items():
        flat[collection][flax_path] = _from_torch(flax_path, state[key])
    return {collection: nest(tree) for collection, tree in flat.items()}

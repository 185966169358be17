"""LPIPS-VGG weights (torchvision VGG16 trunk + lpips calibration) as a ``models.vgg.LPIPS`` params tree.

Two files, both local: the trunk is a torchvision ``vgg16`` state_dict (``features.N.weight``
/ ``.bias``; the classifier is not used), the calibration is the lpips package's
``weights/v0.1/vgg.pth`` (``lin{k}.model.1.weight``, arXiv:1801.03924). When no calibration
path is given, the copy shipped inside an installed ``lpips`` package is used; lpips is
located with importlib and never imported (it imports torchvision).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from biflow_jax.interop.state_dicts import check_keys, nest, read_torch_file
from biflow_jax.models.vgg import TAP_CHANNELS, VGG16_LAYOUT, vgg16_conv_indices

Params = dict[str, Any]

_VGG_NEEDED = "a torchvision vgg16 state_dict, e.g. vgg16-397923af.pth"
_LIN_NEEDED = "the lpips package's weights/v0.1/vgg.pth"


def vgg16_feature_shapes(in_channels: int = 3) -> dict[str, tuple[int, ...]]:
    """torchvision key -> shape of every ``vgg16().features`` tensor up to relu5_3."""
    shapes: dict[str, tuple[int, ...]] = {}
    widths = [int(item) for item in VGG16_LAYOUT if item != "M"]
    for index, width in zip(vgg16_conv_indices(), widths):
        shapes[f"features.{index}.weight"] = (width, in_channels, 3, 3)
        shapes[f"features.{index}.bias"] = (width,)
        in_channels = width
    return shapes


def lin_shapes() -> dict[str, tuple[int, ...]]:
    """lpips key -> shape of the five VGG calibration 1x1 convs."""
    return {f"lin{k}.model.1.weight": (1, channels, 1, 1) for k, channels in enumerate(TAP_CHANNELS)}


def shipped_lin_path() -> Path:
    """The ``weights/v0.1/vgg.pth`` inside the installed lpips package (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"no lin_path given and no lpips package is installed; pass lin_path=({_LIN_NEEDED})")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    if not path.is_file():
        raise FileNotFoundError(f"no lin_path given and the installed lpips package has no {path}; "
                                f"pass lin_path=({_LIN_NEEDED})")
    return path


def _read(path: Path, what: str, needed: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path} ({needed})")
    return read_torch_file(path)


def vgg16_params(state: dict[str, np.ndarray], source: str = "VGG16 state_dict") -> Params:
    """The ``VGG16Features`` params tree from a torchvision vgg16 state_dict (classifier keys ignored)."""
    features = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    expected = vgg16_feature_shapes()
    # features.30 is a parameterless max-pool, so a full vgg16 state_dict has exactly these keys.
    check_keys(features, expected, source)
    flat = {}
    for index in vgg16_conv_indices():
        weight = features[f"features.{index}.weight"]
        flat[f"features_{index}/kernel"] = np.transpose(weight, (2, 3, 1, 0)).astype(np.float32)  # OIHW -> HWIO
        flat[f"features_{index}/bias"] = np.asarray(features[f"features.{index}.bias"], np.float32)
    return nest(flat)


def lin_params(state: dict[str, np.ndarray], source: str = "LPIPS calibration") -> Params:
    """``{'lin0': {'kernel': (C, 1)}, ...}`` from the lpips calibration state_dict."""
    check_keys(state, lin_shapes(), source)
    return {f"lin{k}": {"kernel": np.asarray(state[f"lin{k}.model.1.weight"], np.float32).reshape(1, -1).T}
            for k in range(len(TAP_CHANNELS))}


def load_lpips(vgg16_path: str | os.PathLike[str], lin_path: str | os.PathLike[str] | None = None) -> Params:
    """The params tree of ``models.vgg.LPIPS``: ``{'vgg': ..., 'lin0': ..., ..., 'lin4': ...}``.

    ``vgg16_path``: a torchvision vgg16 state_dict (.pth). ``lin_path``: lpips's
    ``weights/v0.1/vgg.pth``; None uses the copy shipped in the installed lpips package.
    Missing files raise FileNotFoundError; missing, unexpected or wrongly shaped keys raise
    ValueError naming each key (with both shapes).
    """
    vgg16_path = Path(vgg16_path)
    lin_file = shipped_lin_path() if lin_path is None else Path(lin_path)
    trunk = vgg16_params(_read(vgg16_path, "VGG16", _VGG_NEEDED), f"VGG16 state_dict {vgg16_path}")
    lins = lin_params(_read(lin_file, "LPIPS calibration", _LIN_NEEDED), f"LPIPS calibration {lin_file}")
    return {"vgg": trunk, **lins}

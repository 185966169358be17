"""PyTorch reference packages for parity tests (diffusers, lpips, pytorch-fid, torchvision).

torchvision's compiled operators (nms, roi_align, ...) are built against CUDA torch and do
not load beside the CPU build of torch 2.13.0 this project pins. The reference models need
only torchvision's Python layer definitions (VGG16, Inception-v3), so `torchvision()`
imports it without registering fake kernels for those detection operators.
"""

from __future__ import annotations

import sys
import types

import pytest


def torchvision():
    """The torchvision package, importable without its compiled detection operators."""
    pytest.importorskip("torch")
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    return pytest.importorskip("torchvision")

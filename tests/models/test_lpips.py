"""LPIPS-VGG (arXiv:1801.03924) in Flax against the lpips package, through the weight loader."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference

from biflow_jax.interop.lpips_weights import load_lpips, shipped_lin_path
from biflow_jax.models.vgg import LPIPS, unit_normalize

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated since 0.13:UserWarning")  # lpips's own torchvision call

REL_TOL = 1e-5  # relative error of each distance against lpips


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """lpips.LPIPS with a random VGG trunk, that trunk saved as a torchvision vgg16 state_dict."""
    tv = torch_reference.torchvision()
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    vgg = tv.models.vgg16(weights=None)
    trunk = {name: module for piece in (model.net.slice1, model.net.slice2, model.net.slice3,
                                        model.net.slice4, model.net.slice5) for name, module in piece.named_children()}
    with torch.no_grad():
        for index, module in trunk.items():
            if isinstance(module, torch.nn.Conv2d):
                vgg.features[int(index)].weight.copy_(module.weight)
                vgg.features[int(index)].bias.copy_(module.bias)
    path = tmp_path_factory.mktemp("lpips") / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def flax_lpips(reference):
    _, path = reference
    params = load_lpips(path)  # calibration: the real one shipped with lpips
    return jax.jit(lambda a, b: LPIPS().apply({"params": params}, a, b))


@pytest.mark.parametrize("size", [64, 224])
def test_matches_lpips_package(reference, flax_lpips, size):
    model, _ = reference
    rng = np.random.default_rng(size)
    x0 = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    x1 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x0).permute(0, 3, 1, 2), torch.from_numpy(x1).permute(0, 3, 1, 2))
    expected = expected.numpy().reshape(-1)
    got = np.asarray(flax_lpips(jnp.asarray(x0), jnp.asarray(x1)))
    rel = np.max(np.abs(got - expected) / np.abs(expected))
    print(f"LPIPS {size}px: max relative error {rel:.2e}, distances {got}")
    assert got.shape == (2,)
    assert rel < REL_TOL, f"max relative error {rel:.2e} >= {REL_TOL:g}"


def test_distance_to_itself_is_zero(flax_lpips):
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    # Not bit-exact: XLA's convolution may round the two halves of the 2B batch differently (~1e-16 here).
    np.testing.assert_allclose(np.asarray(flax_lpips(x, x)), np.zeros(2, np.float32), rtol=0, atol=1e-10)


def test_gradient_finite_where_a_tap_is_all_zero():
    """An all-zero ReLU tap (where sqrt has infinite slope) must not make the gradient NaN."""
    z = jnp.asarray(np.random.default_rng(2).normal(size=(1, 2, 2, 8)), jnp.float32).at[0, 0, 0].set(-1.0)
    target = unit_normalize(jnp.ones_like(z))
    grad = jax.grad(lambda v: jnp.sum(jnp.square(unit_normalize(jax.nn.relu(v)) - target)))(z)
    assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)


def test_missing_files_are_named(reference, tmp_path):
    _, path = reference
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_lpips(missing)
    with pytest.raises(FileNotFoundError, match="no_lin.pth"):
        load_lpips(path, tmp_path / "no_lin.pth")


def test_wrong_shape_is_named_with_both_shapes(reference, tmp_path):
    _, path = reference
    state = {k: v for k, v in torch.load(path, weights_only=True).items() if k.startswith("features.")}
    state["features.5.weight"] = torch.zeros(128, 32, 3, 3)
    bad = tmp_path / "bad_vgg16.pth"
    torch.save(state, bad)
    message = r"features\.5\.weight: expected shape \(128, 64, 3, 3\), got \(128, 32, 3, 3\)"
    with pytest.raises(ValueError, match=message):
        load_lpips(bad)
    lin = torch.load(shipped_lin_path(), map_location="cpu", weights_only=True)
    lin["lin2.model.1.weight"] = torch.zeros(1, 255, 1, 1)
    bad_lin = tmp_path / "bad_lin.pth"
    torch.save(lin, bad_lin)
    message = r"lin2\.model\.1\.weight: expected shape \(1, 256, 1, 1\), got \(1, 255, 1, 1\)"
    with pytest.raises(ValueError, match=message):
        load_lpips(path, bad_lin)

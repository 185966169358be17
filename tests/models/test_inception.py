"""FID Inception-v3 in Flax vs pytorch-fid's network, built without downloading anything.

The reference is assembled the way pytorch-fid's ``fid_inception_v3`` does it (torchvision
``inception_v3(num_classes=1008, aux_logits=False, init_weights=False)`` with Mixed_5b..Mixed_7c
replaced by ``FIDInceptionA/C/E_1/E_2``) minus the ``load_state_dict_from_url`` call. Every
tensor is then re-drawn (He-scaled convs, non-trivial BatchNorm affine and running stats, fc),
so a swapped or mis-transposed tensor shows up as an O(1) error. The state_dict goes through a
.pth file and ``load_inception``.

At 299 px the raw network is compared (input already in [-1, 1]; ``pool`` from a hook on
``avgpool``, ``logits`` from its output, the sFID tap from a hook on ``Mixed_6d.branch1x1``).
At 64 px pytorch-fid's own ``InceptionV3`` wrapper is compared (its ``resize_input`` and
``normalize_input`` path, i.e. our ``"pytorch_fid"`` preprocessing); it returns only the pool,
so the logits are ``fc`` of it and the sFID tap comes from the same hook.
Tolerance 1e-4 relative to the largest magnitude (observed ~1e-6, float32 on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_reference

torch = pytest.importorskip("torch")
tv = torch_reference.torchvision()
fid_inception = pytest.importorskip("pytorch_fid.inception")
F = torch.nn.functional

from biflow_jax.interop.inception_weights import WEIGHTS_FILE, load_inception  # noqa: E402
from biflow_jax.models.inception import (  # noqa: E402
    InceptionV3,
    preprocess_for_inception,
    resize_for_inception,
)

TOL = 1e-4


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _fid_network(seed: int):
    """pytorch-fid's FID Inception without the weight download, with every tensor randomised."""
    net = tv.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point():
                continue  # num_batches_tracked
            noise = torch.randn(t.shape, generator=gen)
            uniform = torch.rand(t.shape, generator=gen)
            if name.endswith("conv.weight"):
                t.copy_(noise * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith("bn.weight"):
                t.copy_(0.7 + 0.6 * uniform)
            elif name.endswith("running_var"):
                t.copy_(0.5 + uniform)
            elif name == "fc.weight":
                t.copy_(noise / t.shape[1] ** 0.5)
            else:  # bn.bias, running_mean, fc.bias
                t.copy_(0.2 * noise)
    return net.eval()


def _hooked_forward(net, x_nchw):
    """(pool, logits, spatial) of the raw torch network; spatial flattened in (H, W, C) order."""
    taps = {}
    hooks = [net.avgpool.register_forward_hook(lambda m, i, o: taps.__setitem__("pool", o)),
             net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.__setitem__("spatial", o))]
    try:
        with torch.no_grad():
            logits = net(x_nchw)
    finally:
        for h in hooks:
            h.remove()
    spatial = taps["spatial"][:, :7].permute(0, 2, 3, 1).reshape(x_nchw.shape[0], -1)
    return taps["pool"].flatten(1).numpy(), logits.numpy(), spatial.numpy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    net = _fid_network(seed=0)
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    variables = load_inception(path)
    apply = jax.jit(InceptionV3().apply)
    return net, path, variables, apply


def test_parity_299_raw_network(reference):
    net, _, variables, apply = reference
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
    pool, logits, spatial = _hooked_forward(net, torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    ours = apply(variables, jnp.asarray(x))
    assert ours.spatial.shape == (2, 17 * 17 * 7)
    errs = {"pool": _rel_err(ours.pool, pool), "logits": _rel_err(ours.logits, logits),
            "spatial": _rel_err(ours.spatial, spatial)}
    assert max(errs.values()) < TOL, errs
    assert np.abs(pool).max() > 1e-2 and np.abs(spatial).max() > 1e-2  # not a vanishing network
    is_logits = pool @ net.fc.weight.detach().numpy().T  # ADM / Salimans: no bias
    assert _rel_err(ours.is_logits, is_logits) < TOL


def test_parity_64_pytorch_fid_wrapper(reference, monkeypatch):
    """pytorch-fid's wrapper (resize + [0,1] -> [-1,1]); its blocks are ``net``'s modules, so hooks see them."""
    net, _, variables, apply = reference
    monkeypatch.setattr(fid_inception, "fid_inception_v3", lambda: net)  # no download
    wrapper = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    rng = np.random.default_rng(2)
    x01 = rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    taps = {}
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.__setitem__("spatial", o))
    try:
        with torch.no_grad():
            (pool,) = wrapper(torch.from_numpy(x01).permute(0, 3, 1, 2).contiguous())
            pool = pool.flatten(1)
            logits = net.fc(pool).numpy()  # the wrapper stops at the pool; fc is all that follows
    finally:
        hook.remove()
    spatial = taps["spatial"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    ours = apply(variables, preprocess_for_inception(jnp.asarray(x01 * 255), convention="pytorch_fid"))
    errs = {"pool": _rel_err(ours.pool, pool.numpy()), "logits": _rel_err(ours.logits, logits),
            "spatial": _rel_err(ours.spatial, spatial)}
    assert max(errs.values()) < TOL, errs


@pytest.mark.parametrize("size", [64, 512])
def test_resize_pytorch_fid_convention(size):
    x = np.random.default_rng(size).integers(0, 256, (2, size, size, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    assert np.abs(np.asarray(resize_for_inception(x, convention="pytorch_fid")) - ref).max() < 1e-3


@pytest.mark.parametrize("size", [64, 512])
def test_resize_adm_convention_is_tf1_resize_bilinear(size):
    """The TF graph's ResizeBilinear node: align_corners=False, no half-pixel centres."""
    tf = pytest.importorskip("tensorflow")
    x = np.random.default_rng(size).integers(0, 256, (2, size, size, 3)).astype(np.float32)
    ref = tf.raw_ops.ResizeBilinear(images=x, size=[299, 299], align_corners=False,
                                    half_pixel_centers=False).numpy()
    assert np.abs(np.asarray(resize_for_inception(x, convention="adm")) - ref).max() < 1e-3


def test_missing_file_names_what_is_needed(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch-fid") as info:
        load_inception(tmp_path / "nothing.pth")
    assert WEIGHTS_FILE in str(info.value)


def test_wrong_shape_names_key_and_shapes(reference, tmp_path):
    net, _, _, _ = reference
    state = dict(net.state_dict())
    state["fc.weight"] = torch.zeros(1000, 2048)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"fc\.weight: expected shape \(1008, 2048\), got \(1000, 2048\)"):
        load_inception(path)

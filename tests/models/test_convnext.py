"""ConvNeXt-V2 (arXiv:2301.00808) in Flax against transformers' ConvNextV2Model, through the loader."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference

from biflow_jax.interop.convnext_weights import flax_shapes, load_convnext, transformers_shapes
from biflow_jax.interop.state_dicts import flatten
from biflow_jax.models.convnext import ConvNeXtV2, convnext_config, imagenet_normalize

torch_reference.torchvision()  # transformers imports torchvision when it is installed
transformers = pytest.importorskip("transformers")

ABS_TOL = 1e-4  # absolute error of the pooled, layer-normed (O(1)) features


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A small random ConvNextV2Model with every tensor perturbed (GRN and norms too), saved."""
    torch.manual_seed(0)
    config = transformers.ConvNextV2Config(depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 48, 64], image_size=64)
    model = transformers.ConvNextV2Model(config).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.1 * torch.randn_like(tensor))
    directory = tmp_path_factory.mktemp("convnextv2")
    assert all(bool(torch.all(t != 0)) for k, t in model.state_dict().items() if "grn" in k)
    model.save_pretrained(directory)
    return model, directory


def test_matches_transformers(reference):
    model, directory = reference
    config, params = load_convnext(directory)
    assert config.depths == (1, 1, 2, 1) and config.hidden_sizes == (16, 32, 48, 64)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    pixels = np.array(imagenet_normalize(jnp.asarray(x)))
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    pooled, hidden = jax.jit(lambda v: ConvNeXtV2(config).apply({"params": params}, v, return_hidden=True))(pixels)
    pooled_err = np.max(np.abs(np.asarray(pooled) - out.pooler_output.numpy()))
    expected_hidden = out.last_hidden_state.permute(0, 2, 3, 1).numpy()
    hidden_err = np.max(np.abs(np.asarray(hidden) - expected_hidden)) / np.max(np.abs(expected_hidden))
    print(f"ConvNeXt-V2 pooled max abs error {pooled_err:.2e}, last hidden max error / max |value| {hidden_err:.2e}")
    assert pooled.shape == (2, 64) and hidden.shape == (2, 2, 2, 64)
    assert pooled_err < ABS_TOL, f"pooled features: max absolute error {pooled_err:.2e} >= {ABS_TOL:g}"
    assert hidden_err < ABS_TOL, f"last hidden state: max error relative to max |value| {hidden_err:.2e}"


def test_classification_checkpoint_loads_the_same_trunk(reference, tmp_path):
    model, directory = reference
    classifier = transformers.ConvNextV2ForImageClassification(model.config)
    classifier.convnextv2.load_state_dict(model.state_dict())
    classifier.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        saved = set(f.keys())
    assert "convnextv2.layernorm.weight" in saved and "classifier.weight" in saved
    _, expected = load_convnext(directory)
    _, got = load_convnext(tmp_path)
    expected, got = flatten(expected), flatten(got)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_base_architecture_matches_transformers():
    """ConvNeXt-V2-Base: same tensors (keys, shapes, count) as transformers; built on the meta device, not run."""
    config = convnext_config("base")
    hf_config = transformers.ConvNextV2Config(depths=list(config.depths), hidden_sizes=list(config.hidden_sizes))
    with torch.device("meta"):
        torch_model = transformers.ConvNextV2Model(hf_config)
    torch_shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    assert transformers_shapes(config) == torch_shapes
    abstract = jax.eval_shape(lambda: ConvNeXtV2(config).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    ours = {k: tuple(v.shape) for k, v in flatten(abstract["params"]).items()}
    assert ours == flax_shapes(config)
    count = sum(int(np.prod(s)) for s in ours.values())
    assert count == sum(p.numel() for p in torch_model.parameters())
    print(f"ConvNeXt-V2-Base parameters: {count}")


def test_missing_files_are_named(reference, tmp_path):
    _, directory = reference
    with pytest.raises(FileNotFoundError, match="nowhere.*facebook/convnextv2-base-22k-224"):
        load_convnext(tmp_path / "nowhere")
    empty = tmp_path / "config_only"
    empty.mkdir()
    (empty / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors.*facebook/convnextv2-base-22k-224"):
        load_convnext(empty)


def test_wrong_shape_is_named_with_both_shapes(reference, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, directory = reference
    state = load_file(str(directory / "model.safetensors"))
    key = "encoder.stages.2.layers.1.grn.weight"
    state[key] = np.zeros((1, 1, 1, 190), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(json.loads((directory / "config.json").read_text())))
    message = r"encoder\.stages\.2\.layers\.1\.grn\.weight: expected shape \(1, 1, 1, 192\), got \(1, 1, 1, 190\)"
    with pytest.raises(ValueError, match=message):
        load_convnext(tmp_path)


def test_grn_gradient_of_an_all_zero_channel_is_finite_and_equals_transformers():
    """A channel that is zero over the whole map (one exact-zero GELU output at a 1x1 map): torch's
    vector_norm has slope 0 at 0, a plain sqrt gives NaN (inf * 0) and poisoned stage 2's gradient."""
    from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2GRN

    from biflow_jax.models.convnext import GRN

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 1, 6)).astype(np.float32)
    x[0, :, :, 2] = 0.0  # channel 2 of the first image is all zero
    gamma, beta = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    cotangent = rng.standard_normal(x.shape).astype(np.float32)

    def loss(inputs):
        out = GRN().apply({"params": {"gamma": jnp.asarray(gamma), "beta": jnp.asarray(beta)}}, inputs)
        return jnp.sum(out * cotangent)

    ours = np.asarray(jax.grad(loss)(jnp.asarray(x)))
    grn = ConvNextV2GRN(6)
    with torch.no_grad():
        grn.weight.copy_(torch.from_numpy(gamma).reshape(grn.weight.shape))
        grn.bias.copy_(torch.from_numpy(beta).reshape(grn.bias.shape))
    xt = torch.from_numpy(x).requires_grad_(True)
    (grn(xt) * torch.from_numpy(cotangent)).sum().backward()
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, xt.grad.numpy(), rtol=1e-5, atol=1e-5)  # float32 rounding

"""DINOv2 Flax port vs transformers on tiny random checkpoints written by the tests.

Tolerance: 1e-4 max-abs on final-LayerNorm features (float32 on CPU; the observed
error is ~1e-6). All weights are randomised away from their init (LayerScale,
LayerNorm affine, position embeddings, ...) so a swapped or mis-transposed tensor
shows up as an O(1) error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from biflow_jax.interop.dino_weights import hub_config, load_dino  # noqa: E402
from biflow_jax.models.dino import (  # noqa: E402
    DinoConfig,
    Dinov2,
    bicubic_resize_matrix,
    dinov2_config,
)
from biflow_jax.models.dino_preprocess import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    preprocess_for_dino,
)

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
# config.image_size 56 -> 4x4 position grid. (56, 56) needs no interpolation;
# (42, 70) -> 3x5 grid, so the rows are downsampled and the columns upsampled.
IMAGE_SIZE = 56
INPUT_SIZES = [(56, 56), (42, 70)]


def _tiny_hf(registers: bool, swiglu: bool, seed: int):
    kw = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=14,
        image_size=IMAGE_SIZE,
        use_swiglu_ffn=swiglu,
    )
    torch.manual_seed(seed)
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **kw)
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("lambda1"):
                p.copy_(0.5 + 0.5 * noise)
            elif p.ndim >= 2 and "embeddings." in name and "patch" not in name:
                p.copy_(0.5 * noise)  # cls / position / register / mask tokens
            else:
                fan_in = p[0].numel() if p.ndim >= 2 else 16
                p.copy_(noise / fan_in**0.5)
    return model.eval()


def _images(hw: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, *hw, 3)).astype(np.float32)


def _torch_features(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    hidden = out.last_hidden_state.numpy()  # post final LayerNorm
    np.testing.assert_array_equal(out.pooler_output.numpy(), hidden[:, 0])
    r = getattr(model.config, "num_register_tokens", 0)
    return hidden[:, 0], hidden[:, 1 + r :], hidden[:, 1 : 1 + r]


@functools.cache
def _jit_apply(cfg: DinoConfig, dtype=jnp.float32):
    """One jitted forward per (config, dtype), shared by tests to save compile time."""
    return jax.jit(lambda p, x: Dinov2(cfg, dtype=dtype).apply({"params": p}, x))


def _assert_matches(cfg: DinoConfig, params, model) -> None:
    apply = _jit_apply(cfg)
    for i, hw in enumerate(INPUT_SIZES):
        x = _images(hw, seed=i)
        ref_cls, ref_patch, ref_reg = _torch_features(model, x)
        out = apply(params, jnp.asarray(x))
        assert out.patch_tokens.shape == ref_patch.shape == (2, (hw[0] // 14) * (hw[1] // 14), 32)
        assert out.register_tokens.shape == (2, cfg.num_register_tokens, 32)
        np.testing.assert_allclose(np.asarray(out.cls), ref_cls, atol=TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(out.patch_tokens), ref_patch, atol=TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(out.register_tokens), ref_reg, atol=TOL, rtol=0)


def _write_bin(model, directory) -> None:
    """Legacy-format directory: config.json + pytorch_model.bin (in-memory key names)."""
    model.save_pretrained(directory)
    os.remove(os.path.join(directory, "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))


# ----------------------------------------------------------------------------------
# (a) transformers checkpoint directories.


@pytest.mark.parametrize(
    "registers,swiglu,fmt",
    [
        (False, False, "safetensors"),
        (False, True, "bin"),
        (True, False, "bin"),
        (True, True, "sharded"),
    ],
)
def test_transformers_checkpoint_matches_reference(tmp_path, registers, swiglu, fmt):
    model = _tiny_hf(registers, swiglu, seed=1)
    if fmt == "bin":
        _write_bin(model, tmp_path)
    elif fmt == "sharded":
        model.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:
        model.save_pretrained(tmp_path)
    cfg, params = load_dino(tmp_path)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.grid_size) == (32, 2, 2, 4)
    assert cfg.num_register_tokens == (4 if registers else 0)
    assert cfg.use_swiglu_ffn == swiglu
    assert cfg.layer_norm_eps == model.config.layer_norm_eps == 1e-6
    assert cfg.interpolate_antialias == registers  # transformers: antialias only with registers
    _assert_matches(cfg, params, model)


def test_position_interpolation_variant_matters(tmp_path):
    """The antialias flag must change the (42, 70) output: guards the test's sensitivity."""
    model = _tiny_hf(registers=True, swiglu=False, seed=2)
    model.save_pretrained(tmp_path)
    cfg, params = load_dino(tmp_path)
    x = jnp.asarray(_images(INPUT_SIZES[1], seed=0))
    wrong_cfg = dataclasses.replace(cfg, interpolate_antialias=False)
    good = _jit_apply(cfg)(params, x).patch_tokens
    wrong = _jit_apply(wrong_cfg)(params, x).patch_tokens
    assert float(jnp.max(jnp.abs(good - wrong))) > 100 * TOL


@pytest.mark.parametrize("n_in,n_out", [(4, 3), (4, 5), (37, 16), (16, 37), (5, 5)])
@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matrix_matches_torch_interpolate(n_in, n_out, antialias):
    x = np.random.default_rng(0).standard_normal((1, 3, n_in, n_in)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=(n_out, n_in), mode="bicubic", align_corners=False,
        antialias=antialias,
    ).numpy()
    m = bicubic_resize_matrix(n_in, n_out, antialias)
    np.testing.assert_allclose(np.einsum("ia,ncab->ncib", m, x), ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------
# (b) torch-hub state_dict.


def _to_hub_state_dict(model) -> dict[str, torch.Tensor]:
    """Rename a transformers state_dict to the facebookresearch/dinov2 layout."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {
        "cls_token": sd.pop("embeddings.cls_token"),
        "pos_embed": sd.pop("embeddings.position_embeddings"),
        "mask_token": sd.pop("embeddings.mask_token"),
        "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": sd.pop("layernorm.weight"),
        "norm.bias": sd.pop("layernorm.bias"),
    }
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd.pop("embeddings.register_tokens")
    for i in range(model.config.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            out[dst + f"attn.qkv.{t}"] = torch.cat(
                [sd.pop(src + f"attention.{x}_proj.{t}") for x in "qkv"], dim=0
            )
            out[dst + f"attn.proj.{t}"] = sd.pop(src + f"attention.o_proj.{t}")
            out[dst + f"norm1.{t}"] = sd.pop(src + f"norm1.{t}")
            out[dst + f"norm2.{t}"] = sd.pop(src + f"norm2.{t}")
            if model.config.use_swiglu_ffn:
                out[dst + f"mlp.w12.{t}"] = torch.cat(
                    [sd.pop(src + f"mlp.gate_proj.{t}"), sd.pop(src + f"mlp.up_proj.{t}")], dim=0
                )
                out[dst + f"mlp.w3.{t}"] = sd.pop(src + f"mlp.down_proj.{t}")
            else:
                out[dst + f"mlp.fc1.{t}"] = sd.pop(src + f"mlp.fc1.{t}")
                out[dst + f"mlp.fc2.{t}"] = sd.pop(src + f"mlp.fc2.{t}")
        out[dst + "ls1.gamma"] = sd.pop(src + "layer_scale1.lambda1")
        out[dst + "ls2.gamma"] = sd.pop(src + "layer_scale2.lambda1")
    assert not sd, f"unconverted keys {sorted(sd)}"
    return out


def _tiny_dino_config(registers: bool, swiglu: bool) -> DinoConfig:
    return DinoConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        image_size=IMAGE_SIZE,
        num_register_tokens=4 if registers else 0,
        use_swiglu_ffn=swiglu,
        interpolate_antialias=registers,
    )


@pytest.mark.parametrize("registers,swiglu", [(False, False), (True, True)])
def test_hub_state_dict_matches_reference(tmp_path, registers, swiglu):
    model = _tiny_hf(registers, swiglu, seed=3)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(_to_hub_state_dict(model), path)
    cfg, params = load_dino(path, size=_tiny_dino_config(registers, swiglu))
    _assert_matches(cfg, params, model)
    # Both formats must produce the identical params tree.
    model.save_pretrained(tmp_path / "hf")
    cfg_hf, params_hf = load_dino(tmp_path / "hf")
    assert cfg_hf == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params_hf)


def test_hub_config_inferred_from_shapes():
    state = {"cls_token": np.zeros((1, 1, 384)), "register_tokens": np.zeros((1, 4, 384))}
    assert hub_config(state) == dinov2_config("vits14", registers=True)
    assert hub_config({"cls_token": np.zeros((1, 1, 1536))}) == dinov2_config("vitg14")
    with pytest.raises(ValueError, match="size"):
        hub_config({"cls_token": np.zeros((1, 1, 32))})


def test_named_sizes_match_transformers_parameter_count():
    """vitg14+registers: widths, SwiGLU hidden size and the 37x37 grid agree with transformers."""
    cfg = dinov2_config("vitg14", registers=True)
    dims = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_hidden_size)
    assert dims == (1536, 40, 24, 4096)
    hf_cfg = transformers.Dinov2WithRegistersConfig(
        hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True,
        image_size=518, patch_size=14, num_register_tokens=4,
    )
    with torch.device("meta"):
        hf = transformers.Dinov2WithRegistersModel(hf_cfg)
    hf_count = sum(p.numel() for n, p in hf.named_parameters() if "mask_token" not in n)
    shapes = jax.eval_shape(
        Dinov2(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 518, 518, 3), jnp.float32)
    )
    ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert ours == hf_count
    with pytest.raises(ValueError, match="unknown DINOv2 size"):
        dinov2_config("vitx14")


def test_bfloat16_compute_close_to_float32(tmp_path):
    model = _tiny_hf(registers=False, swiglu=False, seed=4)
    model.save_pretrained(tmp_path)
    cfg, params = load_dino(tmp_path)
    x = jnp.asarray(_images((28, 42), seed=0))
    ref = _jit_apply(cfg)(params, x)
    low = _jit_apply(cfg, jnp.bfloat16)(params, x)
    assert low.patch_tokens.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(low.patch_tokens.astype(jnp.float32) - ref.patch_tokens)))
    assert err < 0.25, err


# ----------------------------------------------------------------------------------
# Errors.


def test_missing_paths_raise_file_not_found(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        load_dino(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_dino(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_dino(empty)


def _tweak_remove(sd, key):
    del sd[key]


def _tweak_shape(sd, key):
    sd[key] = sd[key][:-1]


def _tweak_extra(sd, key):
    sd[key] = torch.zeros(3)


@pytest.mark.parametrize(
    "tweak,key,needles",
    [
        (_tweak_remove, "blocks.1.ls2.gamma", ["missing"]),
        (_tweak_shape, "blocks.0.attn.qkv.weight", ["(96, 32)", "(95, 32)"]),
        (_tweak_extra, "blocks.0.attn.extra_bias", ["unexpected"]),
        (_tweak_remove, "register_tokens", ["missing"]),
    ],
)
def test_hub_state_dict_errors_name_the_key(tmp_path, tweak, key, needles):
    model = _tiny_hf(registers=True, swiglu=False, seed=5)
    sd = _to_hub_state_dict(model)
    tweak(sd, key)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as info:
        load_dino(path, size=_tiny_dino_config(registers=True, swiglu=False))
    for needle in [key, *needles]:
        assert needle in str(info.value)


def test_transformers_checkpoint_errors_name_the_key(tmp_path):
    model = _tiny_hf(registers=False, swiglu=False, seed=6)
    model.save_pretrained(tmp_path)
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    key = "encoder.layer.1.attention.attention.value.bias"
    sd.pop(key)
    sd["encoder.layer.0.mlp.fc3.weight"] = np.zeros((2, 2), np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        load_dino(tmp_path)
    assert key in str(info.value)
    assert "encoder.layer.0.mlp.fc3.weight" in str(info.value)


# ----------------------------------------------------------------------------------
# Preprocessing.


def test_preprocess_constant_image_and_shape():
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    # Per-channel constants in [-1, 1]: the output must be the per-channel constant
    # ((v + 1) / 2 - mean) / std, which also checks the channel order of mean/std.
    values = np.array([-1.0, 0.2, 1.0], np.float32)
    images = jnp.broadcast_to(jnp.asarray(values), (2, 32, 48, 3))
    out = jax.jit(preprocess_for_dino, static_argnums=1)(images, 224)
    assert out.shape == (2, 224, 224, 3) and out.dtype == jnp.float32
    expected = ((values + 1) / 2 - mean) / std
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(expected, out.shape), atol=1e-5)
    assert preprocess_for_dino(images[:, :, :32], resolution=14).shape == (2, 14, 14, 3)


def test_preprocess_resize_is_bicubic():
    """Upscaling a step edge overshoots with a cubic kernel (linear/nearest never do)."""
    row = jnp.where(jnp.arange(8) < 4, -1.0, 1.0)
    images = jnp.broadcast_to(row[None, None, :, None], (1, 8, 8, 3))
    out = np.asarray(preprocess_for_dino(images, resolution=32))[0, 16, :, 0]
    lo = (0.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    hi = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert out.min() < lo - 0.05 and out.max() > hi + 0.05


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("size_in", [(20, 30), (300, 260)])
def test_preprocess_resize_matches_torch_bicubic(size_in, antialias):
    """Up- and downscaling to 56 px equal torch's F.interpolate(bicubic) with the same antialias:
    False is REPA-style encoder preprocessing, True the PIL-style resize of transformers' processor."""
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (2, *size_in, 3)).astype(np.float32)
    out = np.asarray(preprocess_for_dino(jnp.asarray(images), resolution=56, antialias=antialias))
    normalised = ((images + 1) / 2 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)

    def torch_resize(aa: bool) -> np.ndarray:
        x = torch.from_numpy(normalised.transpose(0, 3, 1, 2))
        y = torch.nn.functional.interpolate(x, size=(56, 56), mode="bicubic", antialias=aa, align_corners=False)
        return y.numpy().transpose(0, 2, 3, 1)

    np.testing.assert_allclose(out, torch_resize(antialias), atol=2e-5, rtol=0)
    assert np.abs(torch_resize(not antialias) - out).max() > 0.05  # the two conventions differ; the test can tell

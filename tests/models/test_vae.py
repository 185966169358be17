"""Stable Diffusion's KL autoencoder (arXiv:2112.10752) in Flax against diffusers' AutoencoderKL.

Reference models are randomly initialised with every tensor perturbed (GroupNorm affines
included), saved with ``save_pretrained`` and read back through ``load_vae``, so the test
covers the file formats, the name mapping and the forward pass together.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference

from biflow_jax.interop.state_dicts import flatten, nest
from biflow_jax.interop.vae_weights import (
    abstract_params,
    config_from_diffusers,
    expected_state_shapes,
    load_vae,
    vae_params_from_state_dict,
    vae_params_to_state_dict,
)
from biflow_jax.models.vae import AutoencoderKL, VAEConfig, scale_latents, unscale_latents, vae_config

REL_TOL = 1e-4  # max |ours - diffusers| / max |diffusers|, float32
SD_VAE_PARAMS = 83_653_863  # stabilityai/sd-vae-ft-ema

# Two reduced architectures that together exercise every option: shortcut convs, quant convs on/off,
# mid-block attention on/off, 2 and 3 levels (downsample padding, upsampling), groups of 4 and 8 channels.
PARITY_CASES = {
    "2level-attn": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        mid_block_add_attention=True, use_quant_conv=True, use_post_quant_conv=True),
    "3level-noattn-noquant": dict(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8,
                                  latent_channels=3, mid_block_add_attention=False, use_quant_conv=False,
                                  use_post_quant_conv=False, scaling_factor=0.3, shift_factor=0.1),
}
IMAGE_SIDE = 32


def _diffusers():
    torch_reference.torchvision()  # diffusers imports transformers, which imports torchvision
    return pytest.importorskip("diffusers")


def _torch_vae(fields: dict, **kwargs):
    levels = len(fields["block_out_channels"])
    return _diffusers().AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                      up_block_types=("UpDecoderBlock2D",) * levels, **fields, **kwargs)


def _perturbed_torch_vae(fields: dict, seed: int):
    torch.manual_seed(seed)
    model = _torch_vae(fields, sample_size=IMAGE_SIDE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1.0 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    return model


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case name -> (torch model, directory written by save_pretrained with safetensors), built once."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model = _perturbed_torch_vae(PARITY_CASES[name], seed=len(name))
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory, safe_serialization=True)
            cache[name] = model, directory
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_parity_with_diffusers(saved, name):
    model, directory = saved(name)
    cfg, params = load_vae(directory)
    fields = PARITY_CASES[name]
    assert cfg == VAEConfig(**fields, sample_size=IMAGE_SIDE)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, IMAGE_SIDE, IMAGE_SIDE, 3)).astype(np.float32)
    side = IMAGE_SIDE // cfg.downsample_factor
    z = rng.standard_normal((2, side, side, cfg.latent_channels)).astype(np.float32)

    with torch.no_grad():
        posterior = model.encode(_nchw(x)).latent_dist
        ref_mean, ref_std = _nhwc(posterior.mean), _nhwc(posterior.std)
        ref_image = _nhwc(model.decode(_nchw(z)).sample)

    vae = AutoencoderKL(cfg)

    @jax.jit
    def run(params, x, z):
        mean, std = vae.apply({"params": params}, x, method=vae.encode)
        return mean, std, vae.apply({"params": params}, z, method=vae.decode)

    mean, std, image = run(params, x, z)
    assert mean.shape == ref_mean.shape and image.shape == ref_image.shape
    errors = {"mean": _rel_err(mean, ref_mean), "std": _rel_err(std, ref_std), "decode": _rel_err(image, ref_image)}
    print(f"max relative error vs diffusers ({name}):", errors)
    for what, err in errors.items():
        assert err < REL_TOL, (f"{name} {what}: max|ours - diffusers| / max|diffusers| = {err:.2e} "
                               f">= {REL_TOL:.0e} (float32)")


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_state_dict_round_trip(saved, name):
    model, directory = saved(name)
    cfg, params = load_vae(directory)
    back = vae_params_to_state_dict(cfg, params)
    reference = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert sorted(back) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_bin_and_sharded_load_the_same_params(saved, tmp_path):
    model, directory = saved("2level-attn")
    _, params = load_vae(directory)
    for sub, kwargs in (("bin", dict(safe_serialization=False)), ("sharded", dict(max_shard_size="100KB"))):
        model.save_pretrained(tmp_path / sub, **kwargs)
        if sub == "sharded":
            assert (tmp_path / sub / "diffusion_pytorch_model.safetensors.index.json").is_file()
        else:
            assert (tmp_path / sub / "diffusion_pytorch_model.bin").is_file()
        _, other = load_vae(tmp_path / sub)
        flat, other_flat = flatten(params), flatten(other)
        assert flat.keys() == other_flat.keys()
        for key in flat:
            np.testing.assert_array_equal(other_flat[key], flat[key], err_msg=f"{sub}: {key}")


def test_legacy_attention_names_load(saved):
    name = "2level-attn"
    model, _ = saved(name)
    cfg = VAEConfig(**PARITY_CASES[name], sample_size=IMAGE_SIDE)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    legacy = {}
    for key, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.endswith("weight"):
                    value = value[:, :, None, None]  # the 1x1-conv layout of the oldest checkpoints
        legacy[key] = value
    expected = flatten(vae_params_from_state_dict(cfg, state))
    got = flatten(vae_params_from_state_dict(cfg, legacy))
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_wrong_shape_names_key_and_both_shapes(saved, tmp_path):
    model, directory = saved("2level-attn")
    from safetensors.numpy import save_file

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    key = "decoder.up_blocks.0.resnets.1.conv2.weight"
    good = state[key].shape
    state[key] = np.ascontiguousarray(state[key][:-1])
    bad = state[key].shape
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError) as info:
        load_vae(tmp_path)
    message = str(info.value)
    assert key in message and str(tuple(good)) in message and str(tuple(bad)) in message, message


def test_missing_files_say_what_is_needed(tmp_path):
    needed = "config.json + diffusion_pytorch_model.safetensors"
    with pytest.raises(FileNotFoundError, match="sd-vae-ft-ema"):
        load_vae(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.json") as info:
        load_vae(tmp_path)
    assert needed in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [32]}))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors") as info:
        load_vae(tmp_path)
    assert needed in str(info.value)


def test_sd_vae_ft_ema_shapes_match_diffusers():
    """The real SD VAE architecture, abstractly: diffusers on the meta device, ours through eval_shape."""
    cfg = vae_config("sd-vae-ft-ema")
    fields = {f: getattr(cfg, f) for f in ("block_out_channels", "layers_per_block", "latent_channels",
                                           "norm_num_groups", "sample_size")}
    with torch.device("meta"):
        reference = _torch_vae(fields)
    ours = abstract_params(cfg)
    assert sum(int(np.prod(leaf.shape)) for leaf in ours.values()) == SD_VAE_PARAMS
    assert sum(p.numel() for p in reference.parameters()) == SD_VAE_PARAMS
    assert expected_state_shapes(cfg) == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert config_from_diffusers(dict(reference.config)) == cfg


def test_latent_scaling_and_config():
    cfg = vae_config("tiny", shift_factor=0.25, scaling_factor=0.5)
    z = jnp.arange(6.0)
    np.testing.assert_allclose(scale_latents(z, cfg), (z - 0.25) * 0.5)
    np.testing.assert_allclose(AutoencoderKL(cfg).unscale_latents(AutoencoderKL(cfg).scale_latents(z)), z,
                               rtol=1e-6)
    assert vae_config("sd-vae-ft-ema").downsample_factor == 8
    np.testing.assert_allclose(unscale_latents(scale_latents(z, cfg), cfg), z, rtol=1e-6)
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(30, 64))
    with pytest.raises(ValueError, match="unknown VAE preset"):
        vae_config("sd-xl")


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    """The reduced-precision path runs and stays near float32 (params, GroupNorm and softmax in float32)."""
    cfg, half_cfg = vae_config("tiny"), vae_config("tiny", dtype="bfloat16")
    assert all(leaf.dtype == jnp.float32 for leaf in abstract_params(half_cfg).values())
    rng = np.random.default_rng(1)
    params = nest({path: (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
                   for path, leaf in abstract_params(cfg).items()})
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)

    @jax.jit
    def both(params, x):
        return AutoencoderKL(cfg).apply({"params": params}, x), AutoencoderKL(half_cfg).apply({"params": params}, x)

    full, half = both(params, x)
    assert half.dtype == jnp.float32 and half.shape == full.shape == x.shape
    assert _rel_err(half, full) < 5e-2

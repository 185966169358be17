"""Latent space end to end: configs/imagenet256_latent.py:smoke encodes a generated folder through a
tiny random VAE, trains stage 1 and stage 2 on the latents and writes VAE-decoded sample grids;
the step's inputs are per-example posterior samples; a missing VAE stops before anything is written."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers.paths import REPO
from latent_setup import make_images, make_vae, smoke_config
from PIL import Image

from biflow_jax import latent_space
from biflow_jax.errors import ConfigError
from biflow_jax.objectives.flow import flow_inputs


def test_smoke_trains_both_stages_in_latent_space_and_decodes_grids(tmp_path):
    from biflow_jax.data import latents
    from biflow_jax.modes import train

    root = str(tmp_path)
    config = smoke_config(root, make_images(root), make_vae(root))
    latents.encode(config, config.data.folder)
    workdir = os.path.join(root, "job")
    results = train.train_and_evaluate(config, workdir)
    assert np.isfinite(results["biflow"]["test_recon_mse"])
    samples = [os.path.join(d, f) for d, _, files in os.walk(workdir) for f in files if f.endswith(".npz")]
    assert len(samples) == 2, samples  # stage 1's exact-inverse samples, stage 2's exact-vs-BiFlow comparison
    for path in samples:
        arrays = np.load(path)
        key = "images" if "images" in arrays else "biflow"
        # Decoded pixels (16x16 RGB from 8x8x4 latents), not latents.
        assert arrays[key].shape[1:] == (16, 16, 3) and arrays[key].dtype == np.uint8
        assert arrays[key].std() > 0
        png = os.path.join(os.path.dirname(path), os.path.basename(path).replace(".npz", ".png"))
        assert Image.open(png).mode == "RGB"


def test_step_inputs_are_posterior_samples_plus_noise():
    latent = ml_collections.ConfigDict(dict(scale=0.5, shift=0.25))
    train = ml_collections.ConfigDict(dict(noise="gaussian", noise_std=0.3, label_drop=0.0))
    mean = jnp.arange(2 * 4 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 4) / 10
    std = jnp.full_like(mean, 0.2)
    batch = {"image": mean, "image_std": std, "label": jnp.array([0, 1])}
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(jax.random.split(jax.random.key(0), 2))
    x, y = flow_inputs(train, 2, batch, keys, latent)
    clean = latent_space.clean_latents(keys[:, 0], batch, latent)
    eps = (clean / 0.5 + 0.25 - mean) / 0.2  # the posterior draw
    noise = (x - clean) / 0.3
    assert 0.8 < float(jnp.std(eps)) < 1.2 and 0.8 < float(jnp.std(noise)) < 1.2
    assert abs(float(jnp.mean(eps * noise))) < 0.2  # independent draws
    assert not np.allclose(eps[0], eps[1])  # each example its own draw
    np.testing.assert_array_equal(y, [0, 1])
    np.testing.assert_allclose(latent_space.mean_latents(mean, latent), (mean - 0.25) * 0.5)


def test_missing_vae_path_stops_training_before_writing(tmp_path):
    from biflow_jax import config_files
    from biflow_jax.modes import train

    config = config_files.load(f"{REPO}/configs/imagenet256_latent.py:smoke")
    workdir = str(tmp_path / "w")
    with pytest.raises(ConfigError, match="latent.vae_path is empty: .*a diffusers AutoencoderKL directory such as "
                                          "one saved from stabilityai/sd-vae-ft-ema"):
        train.train_and_evaluate(config, workdir)
    assert not os.path.exists(workdir)


def test_fid_samplers_decode_latents_through_the_vae(tmp_path):
    from biflow_jax.evaluators import sample_fid
    from biflow_jax.models import registry

    root = str(tmp_path)
    config = smoke_config(root, "", make_vae(root))
    decoder = latent_space.load_decoder(config)
    flow = registry.build_flow(config.model)
    params = flow.init(jax.random.key(0), *registry.flow_example_inputs(config.model))
    settings = {"guidance": None, "seed": 0}
    sampler = sample_fid.exact_sampler(flow, config, config, settings, decoder)
    index, labels = jnp.arange(3), jnp.array([0, 1, 0])
    images = np.asarray(sampler.generate((params, decoder.params), index, labels))
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
    pixel = sample_fid.exact_sampler(flow, config, config, settings)  # the same latents, undecoded
    latents = np.asarray(pixel.generate(params, index, labels))
    assert latents.shape == (3, 8, 8, 4)


def test_pixel_only_modes_refuse_latent_runs():
    from biflow_jax import config_files

    config = config_files.load(f"{REPO}/configs/imagenet256_latent.py:smoke")
    with pytest.raises(ConfigError, match="editing works on pixel-space runs only"):
        latent_space.require_pixel_space(config, "editing")
    latent_space.require_pixel_space(config_files.load(f"{REPO}/configs/digits.py:quick"), "editing")

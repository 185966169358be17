"""Training and sampling in the latent space of a frozen KL autoencoder (the SD VAE).

BiFlow (arXiv:2512.10953), R-REPA (arXiv:2511.22345) and STARFlow (arXiv:2506.06276) train
their ImageNet-256 flows on Stable Diffusion VAE latents (32x32x4, patch 2). A latent run's
data are the VAE posteriors encoded once by `python -m biflow_jax.cli.encode_latents`: every
example holds the posterior mean and std (unscaled). Inside the jitted step each example
draws its own latent z = mean + std * eps and scales it, (z - shift) * scale, which is the
"image" the flow and G see; the flow's Gaussian noise (train.noise_std: R-REPA 0.2,
STARFlow 0.3) is added on top. Samples go back to pixels through the frozen decoder,
whose parameters are always jit arguments (never constants baked into an executable).

The `config.latent` section: enabled, vae_path (a diffusers AutoencoderKL directory),
scale / shift (0.18215 / 0 for sd-vae-ft-ema and -mse), vae_dtype, decode_batch and the
encoding settings (source: the image dataset; store_dtype, shard_size, encode_batch).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax.errors import ConfigError, require

Array = jax.Array

# The key that marks a batch of latent posteriors (the std next to `image`, which holds the mean).
STD_KEY = "image_std"
# Folded into an example's noise key to draw its posterior sample (independent of the noise).
POSTERIOR_FOLD = 0x5EED
NEEDED = ("a diffusers AutoencoderKL directory such as one saved from stabilityai/sd-vae-ft-ema "
          "(config.json + diffusion_pytorch_model.safetensors)")


def enabled(config: Any) -> bool:
    latent = config.get("latent", None)
    return latent is not None and bool(latent.get("enabled", False))


def is_latent_batch(batch: Any) -> bool:
    return STD_KEY in batch


def check_vae_path(latent: Any) -> str:
    """The VAE directory of `config.latent`, or a ConfigError saying what is needed (before anything runs)."""
    path = os.path.expanduser(latent.get("vae_path", "") or "")
    if not path:
        raise ConfigError(f"latent.vae_path is empty: latent-space runs need the frozen VAE, {NEEDED}; "
                          "this code never downloads")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"latent.vae_path={latent.vae_path!r} has no config.json: it must be {NEEDED}")
    return path


def vae_json(latent: Any) -> dict[str, Any]:
    with open(os.path.join(check_vae_path(latent), "config.json")) as f:
        return json.load(f)


def validate(config: Any) -> None:
    """A latent config's VAE, data and model agree; the VAE directory exists. Call before writing anything."""
    if not enabled(config):
        require(config.data.name != "latents",
                "data.name='latents' needs latent.enabled=True (and latent.vae_path to decode samples)")
        return
    latent, data = config.latent, config.data
    raw = vae_json(latent)
    channels = int(raw.get("latent_channels", 4))
    require(data.name == "latents", f"latent.enabled=True needs data.name='latents' (the encoded dataset; "
            f"write it with `python -m biflow_jax.cli.encode_latents`), got data.name={data.name!r}")
    require(data.channels == channels, f"data.channels={data.channels} differs from the VAE's latent_channels="
            f"{channels} ({latent.vae_path})")
    require(config.train.noise == "gaussian", f"train.noise={config.train.noise!r}: latent runs add Gaussian noise "
            "(train.noise='gaussian', noise_std 0.2 for R-REPA, 0.3 for STARFlow)")
    require(latent.scale > 0, f"latent.scale={latent.scale} must be positive")
    require("bpd" not in config.get("evals", {}), "evals.bpd measures 8-bit pixels; a latent run has no such "
            "figure (drop it: --config.evals is a section of evaluators by name)")
    require("digits_quality" not in config.biflow.get("evals", {}),
            "biflow.evals.digits_quality scores 8x8 digits, not latent runs")
    levels = len(raw.get("block_out_channels", (64,)))
    factor = 2 ** (levels - 1)
    require(latent.source.image_size == data.image_size * factor,
            f"latent.source.image_size={latent.source.image_size} is not data.image_size={data.image_size} x the "
            f"VAE's downsampling {factor}")


# ---------------------------------------------------------------------------
# Inside the step.

def posterior_sample(key: Array, mean: Array, std: Array, scale: float, shift: float) -> Array:
    """One example's scaled latent: (mean + std * eps - shift) * scale."""
    eps = jax.random.normal(jax.random.fold_in(key, POSTERIOR_FOLD), mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + std.astype(jnp.float32) * eps - shift) * scale


def clean_latents(keys: Array, batch: dict, latent: Any) -> Array:
    """(N, h, w, c) scaled posterior samples; keys (N,) are the examples' noise keys."""
    if latent is None:
        raise ValueError("a batch of latents needs the config's `latent` section (scale and shift)")
    scale, shift = float(latent.scale), float(latent.shift)
    return jax.vmap(lambda k, m, s: posterior_sample(k, m, s, scale, shift))(keys, batch["image"], batch[STD_KEY])


def noised_latents(keys: Array, batch: dict, noise_std: float, latent: Any) -> Array:
    """The flow's training input x~ = z + noise_std * n, with z from `clean_latents` on the same keys."""
    z = clean_latents(keys, batch, latent)
    noise = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(keys)
    return z + noise_std * noise


def mean_latents(mean: Array, latent: Any) -> Array:
    """Scaled posterior means (a latent batch's `image`): deterministic evaluation and alignment targets."""
    return (mean.astype(jnp.float32) - float(latent.shift)) * float(latent.scale)


def noised_mean_latents(keys: Array, mean: Array, noise_std: float, latent: Any) -> tuple[Array, Array]:
    """(x~, clean): scaled posterior means and the same plus the flow's noise (evaluation inputs)."""
    clean = mean_latents(mean, latent)
    noise = jax.vmap(lambda k: jax.random.normal(k, clean.shape[1:], jnp.float32))(keys)
    return clean + noise_std * noise, clean


# ---------------------------------------------------------------------------
# Decoding.

@dataclasses.dataclass(frozen=True)
class LatentDecoder:
    """The frozen VAE decoder on scaled latents. `params` are passed to `decode` as an argument."""

    model: Any  # models.vae.AutoencoderKL
    params: Any
    scale: float
    shift: float
    batch_size: int = 64

    def decode(self, params: Any, latents: Array) -> Array:
        """Scaled latents (N, h, w, c) -> images (N, H, W, 3) in about [-1, 1], float32 (traceable)."""
        z = latents.astype(jnp.float32) / self.scale + self.shift
        return self.model.apply({"params": params}, z, method=self.model.decode)

    def decode_uint8(self, params: Any, latents: Array) -> Array:
        """Decoded images as uint8 [0, 255] (traceable), the form the data's images have."""
        images = self.decode(params, latents)
        return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    def to_uint8(self, latents: Any) -> np.ndarray:
        """Host-side: decode any number of latents in jitted batches of `batch_size` (the last one padded)."""
        latents = np.asarray(latents, np.float32)
        n = len(latents)
        fn = _jitted_decode(self)
        out = []
        for first in range(0, n, self.batch_size):
            chunk = latents[first:first + self.batch_size]
            pad = self.batch_size - len(chunk) if n > self.batch_size else 0
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            out.append(np.asarray(fn(self.params, jnp.asarray(chunk)))[:len(chunk) - pad])
        return np.concatenate(out) if out else np.zeros((0,), np.uint8)


_DECODERS: dict[int, Any] = {}


def _jitted_decode(decoder: LatentDecoder):
    key = id(decoder)
    if key not in _DECODERS:
        _DECODERS.clear()  # one decoder at a time is all a run uses
        _DECODERS[key] = (decoder, jax.jit(decoder.decode_uint8))
    return _DECODERS[key][1]


def load_decoder(config: Any) -> LatentDecoder | None:
    """The frozen decoder of a latent config (None for a pixel-space config)."""
    if not enabled(config):
        return None
    from biflow_jax.interop.vae_weights import load_vae
    from biflow_jax.models.vae import AutoencoderKL

    latent = config.latent
    cfg, params = load_vae(check_vae_path(latent), dtype=latent.get("vae_dtype", "float32"))
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return LatentDecoder(AutoencoderKL(cfg), params, float(latent.scale), float(latent.shift),
                         int(latent.get("decode_batch", 64)))


def token_image_fn(decoder: LatentDecoder, patch_size: int, size: int, channels: int, remat: bool = False):
    """fn(tokens, frozen) -> decoded images in [-1, 1]: G's final latent tokens through the VAE whose
    params travel in frozen['vae'] (the `image_fn` of BiFlow's perceptual terms in latent space).

    remat: recompute each decoder block's activations in the backward pass, keeping only the block
    inputs (a 256-px SD-VAE decode otherwise keeps most of its activations for the backward).
    """
    from biflow_jax.models.tarflow import unpatchify
    from biflow_jax.models.vae import AutoencoderKL

    if remat:
        decoder = dataclasses.replace(decoder, model=AutoencoderKL(dataclasses.replace(decoder.model.cfg,
                                                                                       remat=True)))

    def fn(tokens: Array, frozen: Any) -> Array:
        return decoder.decode(frozen["vae"], unpatchify(tokens, patch_size, size, size, channels))

    return fn


def require_pixel_space(config: Any, mode: str) -> None:
    """Modes that read or write pixels directly (editing, classification) refuse a latent run in one line."""
    require(not enabled(config), f"{mode} works on pixel-space runs only; this run is in VAE latent space "
            "(latent.enabled); sample, compare and eval decode latent runs")

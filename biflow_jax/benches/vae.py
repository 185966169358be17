"""`python -m biflow_jax.bench vae`: the frozen VAE decoder's time per image, apart from G.

BiFlow (arXiv:2512.10953) quotes 0.29 ms/image for G-B/2 and 1.3 ms/image for the SD-VAE
decode on TPU: in latent space the decoder is the larger cost of 1-NFE sampling. This times
the jitted, batched decode of scaled latents to uint8 images (what sample grids and
evaluators run), random weights of the chosen shape unless --vae_path names real ones.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax.benches.timing import time_call


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="sd-vae-ft-ema", choices=["sd-vae-ft-ema", "tiny"],
                        help="VAE shape with random weights (ignored with --vae_path)")
    parser.add_argument("--vae_path", default="", help="a diffusers AutoencoderKL directory instead of a preset")
    parser.add_argument("--batch", type=int, default=16, help="latents decoded per call")
    parser.add_argument("--latent_size", type=int, default=32, help="latent side (32 for 256x256 images)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--repeats", type=int, default=5)


def run(args: argparse.Namespace) -> dict:
    from biflow_jax.latent_space import LatentDecoder
    from biflow_jax.models.vae import AutoencoderKL, vae_config

    if args.vae_path:
        from biflow_jax.interop.vae_weights import load_vae

        cfg, params = load_vae(args.vae_path, dtype=args.dtype)
    else:
        cfg = vae_config(args.preset, dtype=args.dtype)
        z0 = jnp.zeros((1, args.latent_size, args.latent_size, cfg.latent_channels))
        params = jax.jit(lambda: AutoencoderKL(cfg).init(jax.random.key(0), z0, method=AutoencoderKL.decode))()
        params = params["params"]
    decoder = LatentDecoder(AutoencoderKL(cfg), params, cfg.scaling_factor, cfg.shift_factor, args.batch)
    z = jax.random.normal(jax.random.key(1), (args.batch, args.latent_size, args.latent_size, cfg.latent_channels))
    fn = jax.jit(decoder.decode_uint8)
    lowered = fn.lower(params, z)
    analysis = lowered.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    flops = float((analysis or {}).get("flops", float("nan")))
    seconds = time_call(lambda: fn(params, z), args.repeats)
    used = {k: v for k, v in params.items() if k in ("decoder", "post_quant_conv")}
    n_params = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(used)))
    image = args.latent_size * cfg.downsample_factor
    result = {"vae": args.vae_path or args.preset, "dtype": args.dtype, "batch": args.batch,
              "image_size": image, "decoder_params": n_params,
              "ms_per_image": 1e3 * seconds / args.batch, "images_per_s": args.batch / seconds,
              "gflops_per_image": flops / args.batch / 1e9, "device": jax.devices()[0].device_kind}
    print(f"VAE decode {args.latent_size}x{args.latent_size}x{cfg.latent_channels} -> {image}x{image} "
          f"({result['vae']}, {args.dtype}, batch {args.batch}, {result['device']}): "
          f"{result['ms_per_image']:.3f} ms/image, {result['images_per_s']:.1f} images/s, "
          f"{result['gflops_per_image']:.1f} GFLOP/image")
    return result

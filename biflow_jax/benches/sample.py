"""`python -m biflow_jax.bench sample`: exact-inverse solvers against BiFlow's 1-NFE G.

Images/s of the cached, Jacobi and naive exact inverses of a random-init TARFlow
(arXiv:2412.06329) and of BiFlow's reverse model G (arXiv:2512.10953) at a comparable
parameter count, with XLA's FLOP counts, each as a fraction of this machine's matmul rate
at the solver's own GEMM shapes (`benches.calibration`), MFU where the device's peak is
known, and the cached inverse's and G's latency per image at batch 1.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax.benches import calibration
from biflow_jax.benches.random_flow import perturb_proj_out
from biflow_jax.benches.timing import (
    compiled_flops,
    fmt_flops,
    interleaved_medians,
    peak_flops,
    print_table,
    throughput_fields,
    time_call,
)
from biflow_jax.models.param_trees import count_params
from biflow_jax.models.reverse import ReverseViT
from biflow_jax.models.tarflow import TARFlow
from biflow_jax.samplers import exact_inverse, one_nfe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=256, help="a square number (1-channel image, patch 1)")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=0, help="0: unconditional")
    parser.add_argument("--guidance", type=float, default=0.0, help="CFG scale (needs --classes > 0)")
    parser.add_argument("--jacobi_tol", type=float, default=1e-4)
    parser.add_argument("--proj_out_scale", type=float, default=0.02,
                        help="std of the random proj_out kernels (0 keeps the zero init)")
    parser.add_argument("--in_channels", type=int, default=1)
    parser.add_argument("--patch", type=int, default=1, help="image side = sqrt(tokens) * patch")
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reverse_width", type=int, default=0, help="BiFlow G width (0: the flow's width)")
    parser.add_argument("--reverse_depth", type=int, default=0, help="G depth (0: 2 layers per stage)")
    parser.add_argument("--reverse_heads", type=int, default=0, help="G heads (0: width / 64, at least 1)")
    parser.add_argument("--preset", default="", choices=["", "b2"],
                        help="b2: the paper's B/2 sizes (forward ~113M: width 768, 8x2; G: B/2 ~130M), "
                             "256 latent tokens of 16 dims, bfloat16, batch 256 (for a GPU/TPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache_dtype", default="", choices=["", "float32", "bfloat16"],
                        help="KV-cache dtype of the cached inverse ('' = the compute dtype)")
    parser.add_argument("--segments", type=int, default=0,
                        help="cached decode loops with a static cache prefix (0: automatic, 1: whole cache)")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="peak TFLOP/s per device for MFU")
    parser.add_argument("--naive_repeats", type=int, default=1, help="the naive inverse is slow; 0 skips it")
    parser.add_argument("--jacobi_repeats", type=int, default=-1, help="-1: as --repeats; 0 skips Jacobi")
    parser.add_argument("--latency_repeats", type=int, default=5,
                        help="timed batch-1 calls of the cached inverse and of G for latency per image (0 skips)")
    parser.add_argument("--calibration_s", type=float, default=0.03,
                        help="seconds of work per timed call when calibrating this machine's matmul rate at the "
                             "solvers' GEMM shapes (0 skips the calibration)")
    parser.add_argument("--seed", type=int, default=0)


def apply_preset(args: argparse.Namespace) -> None:
    if args.preset == "b2":
        args.tokens, args.in_channels, args.patch, args.channels, args.blocks, args.layers = 256, 4, 2, 768, 8, 2
        args.reverse_width, args.reverse_depth, args.reverse_heads, args.dtype = 768, 12, 12, "bfloat16"
        if args.batch == 16:
            args.batch = 256


def run(args: argparse.Namespace) -> dict:
    """Images/s of the cached, Jacobi and naive exact inverses of a random-init flow, and of
    BiFlow's 1-NFE reverse model G at a comparable parameter count."""
    apply_preset(args)
    side = math.isqrt(args.tokens)
    if side * side != args.tokens:
        raise ValueError(f"--tokens must be a square number (a square token grid), got {args.tokens}")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    img = side * args.patch
    model = TARFlow(img_size=img, in_channels=args.in_channels, patch_size=args.patch, channels=args.channels,
                    num_blocks=args.blocks, layers_per_block=args.layers, num_classes=args.classes,
                    head_dim=min(args.head_dim, args.channels), dtype=dtype)
    rng = jax.random.PRNGKey(args.seed)
    init_rng, proj_rng, noise_rng, rev_rng = jax.random.split(rng, 4)
    labels = jnp.arange(args.batch, dtype=jnp.int32) % args.classes if args.classes else None
    params = model.init(init_rng, jnp.zeros((1, img, img, args.in_channels)), None if labels is None else labels[:1])
    if args.proj_out_scale > 0:
        params = perturb_proj_out(params, proj_rng, args.proj_out_scale)
    guidance = exact_inverse.Guidance(scale=args.guidance)
    z = jax.random.normal(noise_rng, (args.batch, model.num_tokens, model.token_dim))

    width = args.reverse_width or args.channels
    reverse = ReverseViT(num_tokens=model.num_tokens, token_dim=model.token_dim, num_forward_blocks=model.num_blocks,
                         depth=args.reverse_depth or 2 * (args.blocks + 1), width=width,
                         heads=args.reverse_heads or max(1, width // 64), mlp_ratio=4.0, num_classes=args.classes,
                         dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype])
    rparams = reverse.init(rev_rng, z[:1], None if labels is None else labels[:1], jnp.zeros((1,)))
    decode = jax.jit(lambda p, zz, yy: reverse.apply(p, zz, yy, None).image_tokens)  # params an argument, as cached's

    def one_pass(zz, yy):
        return decode(rparams, zz, yy)

    cache_dtype = args.cache_dtype or None

    def cached(zz=z, yy=labels):
        return exact_inverse.inverse_cached(model, params, zz, yy, guidance, cache_dtype=cache_dtype,
                                            segments=args.segments)

    # The two headline solvers in interleaved rounds, so machine noise hits both alike.
    pair = interleaved_medians({"cached": cached, "biflow": lambda: one_pass(z, labels)}, args.repeats)
    cached_s, biflow_s = pair["cached"], pair["biflow"]
    # Latency per image at batch 1 (one image, its own label): where an accelerator shows the paper's gap.
    z1, y1 = z[:1], None if labels is None else labels[:1]
    latency = (interleaved_medians({"cached": lambda: cached(z1, y1), "biflow": lambda: one_pass(z1, y1)},
                                   args.latency_repeats) if args.latency_repeats else {})
    # Model FLOPs (XLA cost analysis): the exact inverse computes what one forward pass does;
    # G's pass has no loop, so its count is exact.
    forward_flops = compiled_flops(jax.jit(lambda p, x, y: model.apply(p, x, y).z), params,
                                   jnp.zeros((args.batch, img, img, args.in_channels)), labels)
    if guidance.active:
        forward_flops *= 2
    biflow_flops = compiled_flops(decode, rparams, z, labels)
    peak = peak_flops(args.dtype, args.peak_tflops)
    # This machine's matmul rate at each solver's GEMMs: a decode step of the cached inverse runs the
    # flow's layers over one token of every image (2x the rows with CFG); G runs over all N*T rows.
    parts = {"cached": calibration.layer_gemms(args.batch * (2 if guidance.active else 1), args.channels),
             "biflow": calibration.layer_gemms(args.batch * model.num_tokens, width)}
    calib = (calibration.calibrate(parts, sorted({"float32", args.dtype}), args.calibration_s)
             if args.calibration_s > 0 else None)
    rate = {part: calib["rates"][args.dtype][part] if calib else math.nan for part in parts}
    jacobi_repeats = args.repeats if args.jacobi_repeats < 0 else args.jacobi_repeats
    jacobi_s = (time_call(lambda: exact_inverse.inverse_jacobi(model, params, z, labels, guidance, args.jacobi_tol),
                          jacobi_repeats) if jacobi_repeats else math.nan)
    naive_s = (time_call(lambda: exact_inverse.inverse_naive(model, params, z, labels, guidance), args.naive_repeats)
               if args.naive_repeats else math.nan)

    iters, jacobi_err = [], math.nan
    if jacobi_repeats:
        x_cached = exact_inverse.inverse_cached(model, params, z, labels, guidance)
        x_jacobi, iters = exact_inverse.inverse_jacobi(model, params, z, labels, guidance, args.jacobi_tol)
        jacobi_err = float(jnp.max(jnp.abs(x_jacobi.astype(jnp.float32) - x_cached.astype(jnp.float32))))

    flow_params, reverse_params = count_params(params), count_params(rparams)
    result = {
        "device": jax.devices()[0].device_kind, "tokens": args.tokens, "blocks": args.blocks, "batch": args.batch,
        "dtype": args.dtype, "params": flow_params, "reverse_params": reverse_params,
        "reverse_over_forward_params": reverse_params / flow_params,
        "cached_images_per_s": args.batch / cached_s,
        "biflow_images_per_s": args.batch / biflow_s,
        "biflow_over_cached": cached_s / biflow_s,
        "naive_images_per_s": args.batch / naive_s,
        "jacobi_images_per_s": args.batch / jacobi_s,
        "jacobi_iters": [int(k) for k in np.asarray(iters)],
        "cached_over_naive": naive_s / cached_s,
        "cache_dtype": args.cache_dtype or args.dtype, "segments": args.segments,
        **throughput_fields("cached", forward_flops, cached_s, peak, rate["cached"]),
        **throughput_fields("biflow", biflow_flops, biflow_s, peak, rate["biflow"]),
        "calibration": calib,
    }
    if latency:
        result.update(cached_ms_per_image_batch1=1e3 * latency["cached"],
                      biflow_ms_per_image_batch1=1e3 * latency["biflow"],
                      biflow_over_cached_batch1=latency["cached"] / latency["biflow"])
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; {args.tokens} tokens of "
          f"{model.token_dim} dims, {args.blocks} blocks x {args.layers} layers, width {args.channels}, "
          f"batch {args.batch}, {args.dtype}, {flow_params:,} flow params, proj_out ~ N(0, {args.proj_out_scale}^2); "
          f"BiFlow G: depth {reverse.depth}, width {reverse.width}, {reverse_params:,} params "
          f"({reverse_params / flow_params:.2f}x the flow)")
    if calib:
        print("\n".join(calibration.calibration_lines(parts, calib)))
    print_table([
        ("solver", "s/batch", "images/s", "vs cached", "model FLOP/s"),
        ("biflow 1-NFE", f"{biflow_s:.4f}", f"{args.batch / biflow_s:.1f}", f"{cached_s / biflow_s:.1f}x",
         fmt_flops(biflow_flops / biflow_s, rate["biflow"])),
        ("cached", f"{cached_s:.4f}", f"{args.batch / cached_s:.1f}", "1.0x",
         fmt_flops(forward_flops / cached_s, rate["cached"])),
        ("jacobi", f"{jacobi_s:.4f}", f"{args.batch / jacobi_s:.1f}", f"{cached_s / jacobi_s:.2f}x", "-"),
        ("naive", f"{naive_s:.4f}", f"{args.batch / naive_s:.2f}", f"{cached_s / naive_s:.3f}x", "-"),
    ])
    if math.isnan(peak):
        print("MFU omitted: no known peak for this device (pass --peak_tflops)")
    if latency:
        print(f"batch 1 (latency per image): biflow 1-NFE {result['biflow_ms_per_image_batch1']:.2f} ms, cached "
              f"{result['cached_ms_per_image_batch1']:.2f} ms (vs cached: {result['biflow_over_cached_batch1']:.1f}x)")
    print(one_nfe.speed_note(jax.default_backend()))
    if jacobi_repeats:
        print(f"jacobi iterations per block (blocks_0..blocks_{args.blocks - 1}): {result['jacobi_iters']} "
              f"(at most {model.num_tokens}); max |jacobi - cached| = {jacobi_err:.2e} at tol {args.jacobi_tol}")
    return result

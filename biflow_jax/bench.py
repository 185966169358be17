"""Micro-benchmarks: `python -m biflow_jax.bench <subcommand> [--flags]`.

Each subcommand is a function `bench_<name>(args) -> dict` registered in `SUBCOMMANDS`
with the function that declares its flags; it prints a readable table and, as its
last line, one JSON object with the figures, so scripts can parse `tail -n 1`.
Compilation is always excluded: every timed function is run once before timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax import bench_perceptual, bench_vae
from biflow_jax.models.reverse import ReverseViT
from biflow_jax.models.tarflow import TARFlow, count_params
from biflow_jax.samplers import exact_inverse


def perturb_proj_out(params: Any, rng: jax.Array, scale: float = 0.02) -> Any:
    """Replace every block's zero-initialised proj_out kernel by N(0, scale^2) noise.

    At init proj_out's kernel is zero, so (a, b) do not depend on x and every solver
    is trivially exact (Jacobi stops after one step); benchmarks and tests need a
    flow whose transform really depends on the context.
    """
    inner = dict(params["params"])
    for i, name in enumerate(sorted(k for k in inner if k.startswith("blocks_"))):
        block = dict(inner[name])
        proj_out = dict(block["proj_out"])
        kernel = proj_out["kernel"]
        proj_out["kernel"] = scale * jax.random.normal(jax.random.fold_in(rng, i), kernel.shape, kernel.dtype)
        block["proj_out"] = proj_out
        inner[name] = block
    return {**params, "params": inner}


def time_call(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` runs, after one untimed (compiling) run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each fn over `repeats` rounds, all fns once per round (after one
    untimed, compiling call each), in a fresh random order each round."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = np.random.default_rng(0)
    for _ in range(repeats):
        for name in order.permutation(list(fns)):
            start = time.perf_counter()
            jax.block_until_ready(fns[str(name)]())
            times[str(name)].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------------------
# sample: exact-inverse solvers.

def add_sample_args(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--seed", type=int, default=0)


def apply_preset(args: argparse.Namespace) -> None:
    if args.preset == "b2":
        args.tokens, args.in_channels, args.patch, args.channels, args.blocks, args.layers = 256, 4, 2, 768, 8, 2
        args.reverse_width, args.reverse_depth, args.reverse_heads, args.dtype = 768, 12, 12, "bfloat16"
        if args.batch == 16:
            args.batch = 256


def bench_sample(args: argparse.Namespace) -> dict:
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
    one_nfe = jax.jit(lambda zz: reverse.apply(rparams, zz, labels, None).image_tokens)

    cache_dtype = args.cache_dtype or None

    def cached():
        return exact_inverse.inverse_cached(model, params, z, labels, guidance, cache_dtype=cache_dtype,
                                            segments=args.segments)

    # The two headline solvers in interleaved rounds, so machine noise hits both alike.
    pair = interleaved_medians({"cached": cached, "biflow": lambda: one_nfe(z)}, args.repeats)
    cached_s, biflow_s = pair["cached"], pair["biflow"]
    # Model FLOPs (XLA cost analysis): the exact inverse computes what one forward pass does;
    # G's pass has no loop, so its count is exact.
    forward_flops = compiled_flops(jax.jit(lambda p, x, y: model.apply(p, x, y).z), params,
                                   jnp.zeros((args.batch, img, img, args.in_channels)), labels)
    if guidance.active:
        forward_flops *= 2
    biflow_flops = compiled_flops(one_nfe, z)
    peak = peak_flops(args.dtype, args.peak_tflops)
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
        **throughput_fields("cached", forward_flops, cached_s, peak),
        **throughput_fields("biflow", biflow_flops, biflow_s, peak),
    }
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; {args.tokens} tokens of "
          f"{model.token_dim} dims, {args.blocks} blocks x {args.layers} layers, width {args.channels}, "
          f"batch {args.batch}, {args.dtype}, {flow_params:,} flow params, proj_out ~ N(0, {args.proj_out_scale}^2); "
          f"BiFlow G: depth {reverse.depth}, width {reverse.width}, {reverse_params:,} params "
          f"({reverse_params / flow_params:.2f}x the flow)")
    print_table([
        ("solver", "s/batch", "images/s", "vs cached", "model FLOP/s"),
        ("biflow 1-NFE", f"{biflow_s:.4f}", f"{args.batch / biflow_s:.1f}", f"{cached_s / biflow_s:.1f}x",
         fmt_flops(biflow_flops / biflow_s)),
        ("cached", f"{cached_s:.4f}", f"{args.batch / cached_s:.1f}", "1.0x", fmt_flops(forward_flops / cached_s)),
        ("jacobi", f"{jacobi_s:.4f}", f"{args.batch / jacobi_s:.1f}", f"{cached_s / jacobi_s:.2f}x", "-"),
        ("naive", f"{naive_s:.4f}", f"{args.batch / naive_s:.2f}", f"{cached_s / naive_s:.3f}x", "-"),
    ])
    if math.isnan(peak):
        print("MFU omitted: no known peak for this device (pass --peak_tflops)")
    if jacobi_repeats:
        print(f"jacobi iterations per block (blocks_0..blocks_{args.blocks - 1}): {result['jacobi_iters']} "
              f"(at most {model.num_tokens}); max |jacobi - cached| = {jacobi_err:.2e} at tol {args.jacobi_tol}")
    return result


# ---------------------------------------------------------------------------
# train: R-REPA (reverse alignment) step time over the plain NLL step.

def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/digits_align.py",
                        help="a config file with an align section, optionally FILE:ARG; flags below override it")
    parser.add_argument("--img_size", type=int, default=0, help="0: the config's")
    parser.add_argument("--in_channels", type=int, default=0)
    parser.add_argument("--patch", type=int, default=0)
    parser.add_argument("--channels", type=int, default=0)
    parser.add_argument("--head_dim", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=0)
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--locations", default="",
                        help="'block,layer;block,layer' 1-indexed; default: the config's if the sizes are "
                             "unchanged, else the last two blocks at layer 3L/4 (the paper's 7&8, 6 of 8)")
    parser.add_argument("--mode", default="reverse", choices=["reverse", "forward", "detach"])
    parser.add_argument("--passes", type=int, default=1, choices=[1, 2], help="align.reverse_passes")
    parser.add_argument("--encoder", default="tiny", help="random-init DINOv2 size: tiny, vits14, vitb14, ...")
    parser.add_argument("--resolution", type=int, default=0, help="DINO input side (0: the config's)")
    parser.add_argument("--projector_hidden", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2, help="train steps per timed round")
    parser.add_argument("--rounds", type=int, default=15,
                        help="timed rounds, variants in a fresh random order each round; medians (and minima)")


def bench_train(args: argparse.Namespace) -> dict:
    """Seconds per train step: NLL alone, NLL + alignment with a constant teacher (the
    alignment's own cost), and NLL + alignment with a random-init DINOv2 (what a run pays).

    Same flow, batch, optimizer, EMA and jitted loop (`trainer.make_train_step`); the
    variants are timed in interleaved rounds so machine noise hits all of them alike.
    """
    from biflow_jax import config_files, optim, sharding, trainer
    from biflow_jax.models.registry import build_flow
    from biflow_jax.objectives import flow, rrepa

    config = config_files.load(args.config)
    m = config.model
    sizes = dict(img_size=args.img_size, in_channels=args.in_channels, patch_size=args.patch,
                 channels=args.channels, head_dim=args.head_dim, num_blocks=args.blocks,
                 layers_per_block=args.layers)
    changed = {k: v for k, v in sizes.items() if v and v != m[k]}
    m.update(changed)
    if args.channels and not args.head_dim:
        m.head_dim = min(64, m.channels)
    config.data.update(image_size=m.img_size, channels=m.in_channels)
    if args.batch:
        config.train.batch_size = args.batch
    if args.locations:
        locations = [tuple(int(v) for v in pair.split(",")) for pair in args.locations.split(";")]
    elif changed or not config.align.get("locations"):
        layer = max(1, 3 * m.layers_per_block // 4)
        locations = [(max(m.num_blocks - 1, 1), layer), (m.num_blocks, layer)]
    else:
        locations = [tuple(loc) for loc in config.align.locations]
    config.align.update(enabled=True, locations=sorted(set(locations)), mode=args.mode,
                        reverse_passes=args.passes, encoder=args.encoder, random_init=True, weights="")
    if args.resolution:
        config.align.resolution = args.resolution
    if args.projector_hidden:
        config.align.projector_hidden = args.projector_hidden
    rrepa.validate_align(config)

    model = build_flow(m)
    mesh = sharding.make_mesh()
    optimizer = optim.make_optimizer(config.optim, config.train.steps)
    teacher = rrepa.make_teacher(config.align, seed=0)
    constant = rrepa.ConstantTeacher(
        jax.random.normal(jax.random.key(1), (teacher.grid**2, teacher.width), jnp.float32))
    objectives = {
        "nll": flow.make(config, model),
        "align_no_encoder": rrepa.make(config, model, constant),
        "align_with_encoder": rrepa.make(config, model, teacher),
    }
    n = config.train.batch_size
    rng = np.random.default_rng(0)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.AXIS))
    batch = sharding.to_global({
        "image": rng.integers(0, 256, (n, m.img_size, m.img_size, m.in_channels), dtype=np.uint8),
        "label": rng.integers(0, max(m.num_classes, 1), (n,)).astype(np.int32)}, batch_sharding)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    steps, states, frozen = {}, {}, {}
    for name, objective in objectives.items():
        steps[name] = trainer.make_train_step(objective.loss, optimizer, config.train, config.parallel, mesh)
        frozen[name] = None if objective.frozen is None else jax.device_put(objective.frozen, replicated)
        state = steps[name].to_backend(trainer.init_state(objective, optimizer, 0, config.parallel, mesh))
        for _ in range(2):  # compile, then one more warm step
            state, metrics = steps[name](state, batch, frozen[name])
        jax.block_until_ready(state)
        states[name] = state
    encoder = jax.jit(teacher.apply)
    jax.block_until_ready(encoder(frozen["align_with_encoder"]["teacher"], batch["image"]))

    def run_steps(name: str) -> None:
        if name == "encoder_forward":
            features = None
            for _ in range(args.steps):
                features = encoder(frozen["align_with_encoder"]["teacher"], batch["image"])
            jax.block_until_ready(features)
            return
        for _ in range(args.steps):
            states[name], _ = steps[name](states[name], batch, frozen[name])
        jax.block_until_ready(states[name])

    names = list(objectives) + ["encoder_forward"]
    rounds: dict[str, list[float]] = {name: [] for name in names}
    order_rng = np.random.default_rng(0)
    for _ in range(args.rounds):  # a fresh random order each round: no variant always runs first
        for name in order_rng.permutation(names):
            start = time.perf_counter()
            run_steps(str(name))
            rounds[str(name)].append((time.perf_counter() - start) / args.steps)
    seconds = {name: statistics.median(v) for name, v in rounds.items()}
    fastest = {name: min(v) for name, v in rounds.items()}
    nll_s = seconds["nll"]
    result = {
        "device": jax.devices()[0].device_kind, "batch": n, "tokens": model.num_tokens,
        "blocks": m.num_blocks, "layers": m.layers_per_block, "channels": m.channels,
        "flow_params": count_params(jax.eval_shape(objectives["nll"].init, jax.random.key(0))),
        "locations": [list(loc) for loc in config.align.locations], "mode": args.mode, "passes": args.passes,
        "encoder": args.encoder, "encoder_width": teacher.width, "resolution": teacher.resolution,
        "encoder_params": count_params(teacher.params),
        "nll_step_s": nll_s, "align_no_encoder_step_s": seconds["align_no_encoder"],
        "align_with_encoder_step_s": seconds["align_with_encoder"],
        "encoder_forward_s": seconds["encoder_forward"],
        "ratio_excluding_encoder": seconds["align_no_encoder"] / nll_s,
        "ratio_including_encoder": seconds["align_with_encoder"] / nll_s,
        "ratio_excluding_encoder_min": fastest["align_no_encoder"] / fastest["nll"],
        "ratio_including_encoder_min": fastest["align_with_encoder"] / fastest["nll"],
        "per_round_s": rounds,
        "rounds": args.rounds, "steps_per_round": args.steps,
    }
    print(f"device: {result['device']} x{jax.device_count()}; flow {m.num_blocks} blocks x {m.layers_per_block} "
          f"layers, width {m.channels}, {model.num_tokens} tokens, {result['flow_params']:,} params, batch {n}; "
          f"align {args.mode} (passes {args.passes}) at {result['locations']}; random-init encoder "
          f"{args.encoder} ({result['encoder_params']:,} params) at {teacher.resolution}px")
    rows = [("step", "s/step (median)", "vs nll", "s/step (min)", "vs nll (min)")]
    for name, label in [("nll", "nll"), ("align_no_encoder", "align, constant teacher"),
                        ("align_with_encoder", "align, DINOv2 teacher"), ("encoder_forward", "DINOv2 forward alone")]:
        rows.append((label, f"{seconds[name]:.4f}", f"{seconds[name] / nll_s:.2f}x", f"{fastest[name]:.4f}",
                     f"{fastest[name] / fastest['nll']:.2f}x"))
    print_table(rows)
    return result


# ---------------------------------------------------------------------------
# FLOP counts from XLA's cost analysis, and MFU.

# Dense peak FLOP/s per device for MFU, by device kind substring and compute dtype. CPU peaks are
# not listed (they depend on the cores and clocks a run gets): pass --peak_tflops to get an MFU there.
PEAK_TFLOPS = {("H200", "bfloat16"): 989.0, ("H100", "bfloat16"): 989.0, ("A100", "bfloat16"): 312.0,
               ("H200", "float32"): 67.0, ("H100", "float32"): 67.0, ("A100", "float32"): 19.5,
               ("TPU v4", "bfloat16"): 275.0, ("TPU v5 lite", "bfloat16"): 197.0, ("TPU v5", "bfloat16"): 459.0}


def compiled_flops(jitted: Any, *args: Any) -> float:
    """FLOPs XLA's cost analysis counts for one call of `jitted(*args)` (loop bodies count once)."""
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", math.nan))


def peak_flops(dtype: str, override_tflops: float = 0.0) -> float:
    """The device's peak FLOP/s for `dtype`, from --peak_tflops or the table; NaN when unknown."""
    if override_tflops > 0:
        return override_tflops * 1e12 * jax.device_count()
    kind = jax.devices()[0].device_kind
    for (name, kind_dtype), tflops in PEAK_TFLOPS.items():
        if name in kind and kind_dtype == dtype:
            return tflops * 1e12 * jax.device_count()
    return math.nan


def throughput_fields(prefix: str, flops: float, seconds: float, peak: float) -> dict:
    """`{prefix}_flops`, `{prefix}_flop_per_s` and (with a known peak) `{prefix}_mfu`."""
    fields = {f"{prefix}_flops": flops, f"{prefix}_flop_per_s": flops / seconds}
    if not math.isnan(peak):
        fields[f"{prefix}_mfu"] = flops / seconds / peak
    return fields


def fmt_flops(flop_per_s: float) -> str:
    return "n/a" if math.isnan(flop_per_s) else f"{flop_per_s / 1e9:.1f} GFLOP/s"


# ---------------------------------------------------------------------------
# versus_torch: our flow against apple/ml-tarflow's transformer_flow.Model, side by side.

def add_versus_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", default="",
                        help="a folder holding ml-tarflow's transformer_flow.py (imported at run time, never "
                             "copied); empty: time our side alone")
    parser.add_argument("--img_size", type=int, default=32)
    parser.add_argument("--in_channels", type=int, default=3)
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--head_dim", type=int, default=64, help="ml-tarflow's Model always uses 64")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=2.0, help="CFG scale of the guided sampling rows")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our compute dtype")
    parser.add_argument("--cache_dtype", default="", choices=["", "float32", "bfloat16"],
                        help="our KV-cache dtype when sampling ('' = the compute dtype)")
    parser.add_argument("--scan_layers", action="store_true", help="our layers under nn.scan")
    parser.add_argument("--remat", default="none", help="our remat policy: none | full | dots")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core, os.cpu_count())")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds; figures are medians")
    parser.add_argument("--train_steps", type=int, default=2, help="train steps per timed round")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: train,forward,sample,cfg")
    parser.add_argument("--proj_out_scale", type=float, default=0.02,
                        help="std of the random proj_out kernels, so sampling depends on the context")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="peak TFLOP/s per device for MFU (0: a known accelerator's, none on CPU)")
    parser.add_argument("--seed", type=int, default=0)


def load_reference(folder: str):
    """ml-tarflow's transformer_flow module, imported from `folder` (never copied into this repo)."""
    import importlib.util
    import os

    path = os.path.join(folder, "transformer_flow.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--reference={folder!r} has no transformer_flow.py")
    spec = importlib.util.spec_from_file_location("_ml_tarflow_transformer_flow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_versus_torch(args: argparse.Namespace) -> dict:
    """Images/s of the train step (forward + backward + AdamW), the forward pass, and the exact
    inverse without and with CFG: ours (jitted) next to ml-tarflow's PyTorch Model, same weights,
    same config and batch, timed in interleaved rounds (a fresh random order each round), medians."""
    import os

    import optax

    from biflow_jax import likelihood
    from biflow_jax.models.tarflow import build_flow

    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    cfg = dict(img_size=args.img_size, in_channels=args.in_channels, patch_size=args.patch,
               channels=args.channels, num_blocks=args.blocks, layers_per_block=args.layers,
               num_classes=args.classes, head_dim=args.head_dim, expansion=4, clip=0.0, dtype=args.dtype,
               scan_layers=args.scan_layers, remat=args.remat)
    model = build_flow(cfg)
    n, side, channels = args.batch, args.img_size, args.in_channels
    rng = jax.random.PRNGKey(args.seed)
    init_rng, proj_rng, data_rng, noise_rng = jax.random.split(rng, 4)
    labels = jnp.arange(n, dtype=jnp.int32) % args.classes if args.classes else None
    params = model.init(init_rng, jnp.zeros((1, side, side, channels)), None if labels is None else labels[:1])
    if args.proj_out_scale > 0:
        params = perturb_proj_out(params, proj_rng, args.proj_out_scale)
    images = jax.random.uniform(data_rng, (n, side, side, channels), jnp.float32, -1.0, 1.0)
    z = jax.random.normal(noise_rng, (n, model.num_tokens, model.token_dim), jnp.float32)
    guidance = exact_inverse.Guidance(scale=args.guidance)
    cache_dtype = args.cache_dtype or None

    optimizer = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=1e-4)

    def train_step(p, opt_state, x, y):
        def loss_fn(q):
            out = model.apply(q, x, y)
            return likelihood.nll_loss(out.z, out.logdets)

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    forward = jax.jit(lambda p, x, y: model.apply(p, x, y).z)
    state = {"params": jax.tree_util.tree_map(jnp.copy, params), "opt": optimizer.init(params)}

    # Model FLOPs from XLA's cost analysis. With nn.scan the layer loop body would count once,
    # so the counts always come from the unrolled model (the same math).
    flop_model = build_flow({**cfg, "scan_layers": False, "remat": "none"})
    flop_params = model_params_unstacked(model, params)
    flop_forward = jax.jit(lambda p, x, y: flop_model.apply(p, x, y).z)
    train_flops = compiled_flops(jax.jit(lambda p, o, x, y: _flops_train_step(flop_model, optimizer, p, o, x, y)),
                                 flop_params, optimizer.init(flop_params), images, labels)
    forward_flops = compiled_flops(flop_forward, flop_params, images, labels)
    sample_flops = forward_flops
    cfg_flops = compiled_flops(flop_forward, flop_params, jnp.concatenate([images, images]),
                               None if labels is None else jnp.concatenate([labels, jnp.full_like(labels, -1)]))
    peak = peak_flops(args.dtype, args.peak_tflops)

    def ours_train():
        for _ in range(args.train_steps):
            state["params"], state["opt"], loss = step(state["params"], state["opt"], images, labels)
        jax.block_until_ready(loss)

    def ours_sample(g):
        extra = {"cache_dtype": cache_dtype} if cache_dtype else {}
        return exact_inverse.inverse_cached(model, params, z, labels, g, **extra)

    tasks: dict[str, Callable[[], Any]] = {}
    if "train" not in skip:
        tasks["ours_train"] = ours_train
    if "forward" not in skip:
        tasks["ours_forward"] = lambda: jax.block_until_ready(forward(params, images, labels))
    if "sample" not in skip:
        tasks["ours_sample"] = lambda: jax.block_until_ready(ours_sample(exact_inverse.NO_GUIDANCE))
    if "cfg" not in skip and args.classes:
        tasks["ours_cfg"] = lambda: jax.block_until_ready(ours_sample(guidance))

    parity = {}
    torch_threads = None
    if args.reference:
        import torch

        from biflow_jax.interop.tarflow_layout import flow_params_to_state_dict

        reference = load_reference(args.reference)
        torch_threads = args.threads or os.cpu_count()
        torch.set_num_threads(torch_threads)
        if args.head_dim != 64 or args.dtype != "float32":
            raise ValueError("the reference Model has head_dim 64 and float32 weights: use --head_dim=64 "
                             "--dtype=float32 with --reference")
        tmodel = reference.Model(in_channels=channels, img_size=side, patch_size=args.patch,
                                 channels=args.channels, num_blocks=args.blocks, layers_per_block=args.layers,
                                 num_classes=args.classes)
        state_dict = flow_params_to_state_dict(model_params_unstacked(model, params), cfg)
        tmodel.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
        x_t = torch.from_numpy(np.array(images).transpose(0, 3, 1, 2)).contiguous()
        y_t = None if labels is None else torch.from_numpy(np.array(labels)).long()
        z_t = torch.from_numpy(np.array(z))
        train_model = reference.Model(in_channels=channels, img_size=side, patch_size=args.patch,
                                      channels=args.channels, num_blocks=args.blocks,
                                      layers_per_block=args.layers, num_classes=args.classes)
        train_model.load_state_dict(tmodel.state_dict())
        topt = torch.optim.AdamW(train_model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)

        def torch_train():
            for _ in range(args.train_steps):
                zz, _, logdets = train_model(x_t, y_t)
                loss = train_model.get_loss(zz, logdets)
                topt.zero_grad(set_to_none=True)
                loss.backward()
                topt.step()

        def torch_forward():
            with torch.no_grad():
                return tmodel(x_t, y_t)[0]

        def torch_sample(scale):
            with torch.no_grad():
                return tmodel.reverse(z_t, y_t, guidance=scale)

        if "train" not in skip:
            tasks["torch_train"] = torch_train
        if "forward" not in skip:
            tasks["torch_forward"] = torch_forward
        if "sample" not in skip:
            tasks["torch_sample"] = lambda: torch_sample(0.0)
        if "cfg" not in skip and args.classes:
            tasks["torch_cfg"] = lambda: torch_sample(args.guidance)

        # Same weights, same inputs: the two sides must agree before their speeds mean anything.
        ours_z = np.asarray(forward(params, images, labels))
        parity["forward_max_abs_diff"] = float(np.max(np.abs(ours_z - torch_forward().numpy())))
        if "sample" not in skip:
            ours_images = np.asarray(exact_inverse.tokens_to_images(model, ours_sample(exact_inverse.NO_GUIDANCE)))
            parity["sample_max_abs_diff"] = float(
                np.max(np.abs(ours_images - torch_sample(0.0).numpy().transpose(0, 2, 3, 1))))
        if "cfg" not in skip and args.classes:
            ours_images = np.asarray(exact_inverse.tokens_to_images(model, ours_sample(guidance)))
            parity["cfg_max_abs_diff"] = float(
                np.max(np.abs(ours_images - torch_sample(args.guidance).numpy().transpose(0, 2, 3, 1))))

    for fn in tasks.values():  # compile / warm up
        fn()
    rounds: dict[str, list[float]] = {name: [] for name in tasks}
    order_rng = np.random.default_rng(args.seed)
    names = list(tasks)
    for _ in range(args.rounds):
        for name in order_rng.permutation(names):
            start = time.perf_counter()
            tasks[str(name)]()
            elapsed = time.perf_counter() - start
            rounds[str(name)].append(elapsed / (args.train_steps if name.endswith("_train") else 1))
    seconds = {name: statistics.median(v) for name, v in rounds.items()}

    flops = {"train": train_flops, "forward": forward_flops, "sample": sample_flops, "cfg": cfg_flops}
    result: dict[str, Any] = {
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "batch": n,
        "config": {k: v for k, v in cfg.items()}, "cache_dtype": args.cache_dtype or args.dtype,
        "params": count_params(params), "torch_threads": torch_threads, "reference": args.reference or None,
        "cfg_scale": args.guidance, "rounds": args.rounds, "peak_flop_per_s": peak,
    }
    rows = [("part", "ours s", "ours img/s", "ours FLOP/s", "torch s", "torch img/s", "ours/torch")]
    for part in ("train", "forward", "sample", "cfg"):
        ours = seconds.get(f"ours_{part}")
        if ours is None:
            continue
        result[f"ours_{part}_s"] = ours
        result[f"ours_{part}_images_per_s"] = n / ours
        result.update(throughput_fields(f"ours_{part}", flops[part], ours, peak))
        theirs = seconds.get(f"torch_{part}")
        row = [part, f"{ours:.4f}", f"{n / ours:.2f}", fmt_flops(flops[part] / ours)]
        if theirs is not None:
            result[f"torch_{part}_s"] = theirs
            result[f"torch_{part}_images_per_s"] = n / theirs
            result[f"{part}_ratio"] = theirs / ours
            row += [f"{theirs:.4f}", f"{n / theirs:.2f}", f"{theirs / ours:.2f}x"]
        else:
            row += ["-", "-", "-"]
        rows.append(tuple(row))
    result.update(parity)
    result["per_round_s"] = rounds
    print(f"device: {result['device']} x{jax.device_count()}; ours {args.dtype} "
          f"(scan_layers={args.scan_layers}, remat={args.remat}, cache {result['cache_dtype']}); "
          f"{side}x{side}x{channels}, patch {args.patch}, width {args.channels}, {args.blocks} blocks x "
          f"{args.layers} layers, {args.classes} classes, batch {n}, {result['params']:,} params; "
          f"torch threads {torch_threads}; CFG scale {args.guidance}; medians of {args.rounds} interleaved rounds")
    print_table(rows)
    if parity:
        print("same weights, ours vs torch: " + ", ".join(f"{k} {v:.2e}" for k, v in parity.items()))
    if math.isnan(peak):
        print("MFU omitted: no known peak for this device (pass --peak_tflops)")
    return result


def _flops_train_step(model, optimizer, p, opt_state, x, y):
    import optax

    from biflow_jax import likelihood

    def loss_fn(q):
        out = model.apply(q, x, y)
        return likelihood.nll_loss(out.z, out.logdets)

    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss


def model_params_unstacked(model: TARFlow, params: Any) -> Any:
    """The per-layer params tree (the export layout) of a flow, whether or not it scans its layers."""
    if getattr(model, "scan_layers", False):
        from biflow_jax.models.tarflow import unstack_layer_params

        return unstack_layer_params(params)
    return params


# ---------------------------------------------------------------------------
# compile: how long XLA takes to compile a flow's train step, layers unrolled vs under nn.scan.

def add_compile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/imagenet64.py:p4", help="a config file, optionally FILE:ARG")
    parser.add_argument("--batch", type=int, default=0, help="0: the config's train batch size")
    parser.add_argument("--variants", default="unrolled,scan",
                        help="comma-separated: unrolled, scan, unrolled_remat, scan_remat (remat = 'dots')")
    parser.add_argument("--repeats", type=int, default=1, help="compiles per variant (in-process caches cleared)")


def bench_compile(args: argparse.Namespace) -> dict:
    """Seconds to lower and to compile the flow's train step (forward + backward + AdamW) from
    abstract arguments (no parameter is ever materialised), per layer layout."""
    import optax

    from biflow_jax import config_files, likelihood
    from biflow_jax.models.tarflow import build_flow

    config = config_files.load(args.config)
    m = config.model
    batch = args.batch or config.train.batch_size
    variants = {"unrolled": (False, "none"), "scan": (True, "none"),
                "unrolled_remat": (False, "dots"), "scan_remat": (True, "dots")}
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    optimizer = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=1e-4)
    images = jax.ShapeDtypeStruct((batch, m.img_size, m.img_size, m.in_channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32) if m.num_classes else None
    result: dict[str, Any] = {"device": jax.devices()[0].device_kind, "config": args.config, "batch": batch,
                              "dtype": m.dtype, "blocks": m.num_blocks, "layers": m.layers_per_block,
                              "channels": m.channels}
    rows = [("variant", "lower s", "compile s", "params", "HLO ops")]
    for name in chosen:
        scan, remat = variants[name]
        model = build_flow({**m.to_dict(), "scan_layers": scan, "remat": remat})
        params = jax.eval_shape(model.init, jax.random.key(0),
                                jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32),
                                None if labels is None else jax.ShapeDtypeStruct((1,), jnp.int32))
        opt_state = jax.eval_shape(optimizer.init, params)

        def step(p, o, x, y, model=model):
            def loss_fn(q):
                out = model.apply(q, x, y)
                return likelihood.nll_loss(out.z, out.logdets)

            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, o = optimizer.update(grads, o, p)
            return optax.apply_updates(p, updates), o, loss

        lower_s, compile_s = [], []
        for _ in range(args.repeats):
            jax.clear_caches()
            start = time.perf_counter()
            lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, images, labels)
            lower_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            compiled = lowered.compile()
            compile_s.append(time.perf_counter() - start)
        ops = lowered.as_text().count("\n")
        del compiled
        result[f"{name}_lower_s"] = statistics.median(lower_s)
        result[f"{name}_compile_s"] = statistics.median(compile_s)
        result[f"{name}_stablehlo_lines"] = ops
        rows.append((name, f"{statistics.median(lower_s):.1f}", f"{statistics.median(compile_s):.1f}",
                     f"{count_params(params):,}", str(ops)))
        result["params"] = count_params(params)
    if "unrolled_compile_s" in result and "scan_compile_s" in result:
        result["compile_speedup_scan"] = result["unrolled_compile_s"] / result["scan_compile_s"]
    print(f"device: {result['device']}; {args.config}: {m.num_blocks} blocks x {m.layers_per_block} layers, "
          f"width {m.channels}, {m.dtype}, batch {batch}; train step = forward + backward + AdamW, abstract args")
    print_table(rows)
    return result


# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Subcommand:
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]
    help: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "sample": Subcommand(add_sample_args, bench_sample, "exact-inverse sampling: cached vs Jacobi vs naive"),
    "train": Subcommand(add_train_args, bench_train, "R-REPA train step (reverse alignment) vs the NLL step"),
    "compile": Subcommand(add_compile_args, bench_compile,
                          "compile time of a flow's train step: layers unrolled vs under nn.scan"),
    "versus_torch": Subcommand(add_versus_args, bench_versus_torch,
                               "train step and exact inverse: ours vs ml-tarflow's PyTorch Model (--reference)"),
    "vae": Subcommand(bench_vae.add_vae_args, bench_vae.bench_vae, "VAE decode ms/image (latent-space sampling)"),
    "biflow_train": Subcommand(bench_perceptual.add_biflow_train_args, bench_perceptual.bench_biflow_train,
                               "stage-2 train step with / without the perceptual terms (LPIPS, ConvNeXt-V2)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m biflow_jax.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    result = SUBCOMMANDS[args.command].run(args)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

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

from biflow_jax.models.reverse import build_reverse, reverse_config
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
    rcfg = reverse_config("tiny", num_classes=args.classes, dtype=args.dtype)
    rcfg.update(width=width, depth=args.reverse_depth or 2 * (args.blocks + 1),
                heads=args.reverse_heads or max(1, width // 64))
    reverse = build_reverse(rcfg, model.num_tokens, model.token_dim, model.num_blocks)
    rparams = reverse.init(rev_rng, z[:1], None if labels is None else labels[:1], jnp.zeros((1,)))
    one_nfe = jax.jit(lambda zz: reverse.apply(rparams, zz, labels, None).image_tokens)

    cached_s = time_call(lambda: exact_inverse.inverse_cached(model, params, z, labels, guidance), args.repeats)
    biflow_s = time_call(lambda: one_nfe(z), args.repeats)
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
    }
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; {args.tokens} tokens of "
          f"{model.token_dim} dims, {args.blocks} blocks x {args.layers} layers, width {args.channels}, "
          f"batch {args.batch}, {args.dtype}, {flow_params:,} flow params, proj_out ~ N(0, {args.proj_out_scale}^2); "
          f"BiFlow G: depth {rcfg.depth}, width {rcfg.width}, {reverse_params:,} params "
          f"({reverse_params / flow_params:.2f}x the flow)")
    print_table([
        ("solver", "s/batch", "images/s", "vs cached"),
        ("biflow 1-NFE", f"{biflow_s:.4f}", f"{args.batch / biflow_s:.1f}", f"{cached_s / biflow_s:.1f}x"),
        ("cached", f"{cached_s:.4f}", f"{args.batch / cached_s:.1f}", "1.0x"),
        ("jacobi", f"{jacobi_s:.4f}", f"{args.batch / jacobi_s:.1f}", f"{cached_s / jacobi_s:.2f}x"),
        ("naive", f"{naive_s:.4f}", f"{args.batch / naive_s:.2f}", f"{cached_s / naive_s:.3f}x"),
    ])
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


def load_config_file(spec: str):
    """`path.py[:arg]` -> its get_config(arg)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def bench_train(args: argparse.Namespace) -> dict:
    """Seconds per train step: NLL alone, NLL + alignment with a constant teacher (the
    alignment's own cost), and NLL + alignment with a random-init DINOv2 (what a run pays).

    Same flow, batch, optimizer, EMA and jitted loop (`train.make_train_step`); the
    variants are timed in interleaved rounds so machine noise hits all of them alike.
    """
    from biflow_jax import train
    from biflow_jax.data import input_pipeline
    from biflow_jax.models.tarflow import build_flow
    from biflow_jax.objectives import rrepa

    config = load_config_file(args.config)
    if "align" not in config:
        config.align = rrepa.default_align_config()
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
    mesh = train.make_mesh()
    optimizer = train.make_optimizer(config)
    teacher = rrepa.make_teacher(config.align, seed=0)
    constant = rrepa.ConstantTeacher(
        jax.random.normal(jax.random.key(1), (teacher.grid**2, teacher.width), jnp.float32))
    objectives = {
        "nll": train.flow_objective(model, config),
        "align_no_encoder": rrepa.make_objective(model, config, constant),
        "align_with_encoder": rrepa.make_objective(model, config, teacher),
    }
    n = config.train.batch_size
    rng = np.random.default_rng(0)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train.AXIS))
    batch = input_pipeline.to_global({
        "image": rng.integers(0, 256, (n, m.img_size, m.img_size, m.in_channels), dtype=np.uint8),
        "label": rng.integers(0, max(m.num_classes, 1), (n,)).astype(np.int32)}, sharding)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    steps, states, frozen = {}, {}, {}
    for name, objective in objectives.items():
        steps[name] = train.make_train_step(objective.loss, optimizer, config, mesh)
        frozen[name] = None if objective.frozen is None else jax.device_put(objective.frozen, replicated)
        state = steps[name].to_backend(train.init_state(objective, optimizer, config, mesh))
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

@dataclasses.dataclass(frozen=True)
class Subcommand:
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]
    help: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "sample": Subcommand(add_sample_args, bench_sample, "exact-inverse sampling: cached vs Jacobi vs naive"),
    "train": Subcommand(add_train_args, bench_train, "R-REPA train step (reverse alignment) vs the NLL step"),
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

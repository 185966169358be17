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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax import sampling
from biflow_jax.models.tarflow import TARFlow, count_params


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive_repeats", type=int, default=1, help="the naive inverse is slow")
    parser.add_argument("--seed", type=int, default=0)


def bench_sample(args: argparse.Namespace) -> dict:
    """Images/s of the cached, Jacobi and naive exact inverses of a random-init flow."""
    side = math.isqrt(args.tokens)
    if side * side != args.tokens:
        raise ValueError(f"--tokens must be a square number (patch 1 on a square image), got {args.tokens}")
    model = TARFlow(img_size=side, in_channels=1, patch_size=1, channels=args.channels,
                    num_blocks=args.blocks, layers_per_block=args.layers, num_classes=args.classes,
                    head_dim=min(64, args.channels))
    rng = jax.random.PRNGKey(args.seed)
    init_rng, proj_rng, noise_rng = jax.random.split(rng, 3)
    labels = jnp.arange(args.batch, dtype=jnp.int32) % args.classes if args.classes else None
    params = model.init(init_rng, jnp.zeros((1, side, side, 1)), None if labels is None else labels[:1])
    if args.proj_out_scale > 0:
        params = perturb_proj_out(params, proj_rng, args.proj_out_scale)
    guidance = sampling.Guidance(scale=args.guidance)
    z = jax.random.normal(noise_rng, (args.batch, model.num_tokens, model.token_dim))

    cached_s = time_call(lambda: sampling.inverse_cached(model, params, z, labels, guidance), args.repeats)
    jacobi_s = time_call(lambda: sampling.inverse_jacobi(model, params, z, labels, guidance, args.jacobi_tol),
                         args.repeats)
    naive_s = time_call(lambda: sampling.inverse_naive(model, params, z, labels, guidance), args.naive_repeats)

    x_cached = sampling.inverse_cached(model, params, z, labels, guidance)
    x_jacobi, iters = sampling.inverse_jacobi(model, params, z, labels, guidance, args.jacobi_tol)
    jacobi_err = float(jnp.max(jnp.abs(x_jacobi - x_cached)))

    result = {
        "tokens": args.tokens, "blocks": args.blocks, "batch": args.batch,
        "params": count_params(params),
        "cached_images_per_s": args.batch / cached_s,
        "naive_images_per_s": args.batch / naive_s,
        "jacobi_images_per_s": args.batch / jacobi_s,
        "jacobi_iters": [int(k) for k in np.asarray(iters)],
        "cached_over_naive": naive_s / cached_s,
    }
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; {args.tokens} tokens, {args.blocks} "
          f"blocks x {args.layers} layers, width {args.channels}, batch {args.batch}, "
          f"{result['params']:,} params, proj_out ~ N(0, {args.proj_out_scale}^2)")
    print_table([
        ("solver", "s/batch", "images/s", "vs naive"),
        ("cached", f"{cached_s:.4f}", f"{args.batch / cached_s:.1f}", f"{naive_s / cached_s:.1f}x"),
        ("jacobi", f"{jacobi_s:.4f}", f"{args.batch / jacobi_s:.1f}", f"{naive_s / jacobi_s:.1f}x"),
        ("naive", f"{naive_s:.4f}", f"{args.batch / naive_s:.2f}", "1.0x"),
    ])
    print(f"jacobi iterations per block (blocks_0..blocks_{args.blocks - 1}): {result['jacobi_iters']} "
          f"(at most {model.num_tokens}); max |jacobi - cached| = {jacobi_err:.2e} at tol {args.jacobi_tol}")
    return result


# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Subcommand:
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]
    help: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "sample": Subcommand(add_sample_args, bench_sample, "exact-inverse sampling: cached vs Jacobi vs naive"),
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

"""What every bench shares: wall time in interleaved rounds, XLA's FLOP counts, MFU, tables.

Timing rules: compilation is never timed (every function runs once before timing), and
variants that are compared run in interleaved rounds, a fresh random order each round, so
machine noise hits all of them alike; figures are medians over rounds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def time_call(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` runs, after one untimed (compiling) run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_rounds(fns: dict[str, Callable[[], Any]], rounds: int, seed: int = 0,
                       calls: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each fn in each of `rounds` rounds, all fns once per round in a fresh
    random order (from `seed`), divided by `calls[name]` (the steps one call runs; default 1).

    The fns must already be compiled and must block until their work is done.
    """
    calls = calls or {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = np.random.default_rng(seed)
    for _ in range(rounds):
        for name in map(str, order.permutation(list(fns))):
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) / calls.get(name, 1))
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(v) for name, v in times.items()}


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each fn over `repeats` interleaved rounds, after one untimed,
    compiling call each."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    blocking = {name: (lambda fn=fn: jax.block_until_ready(fn())) for name, fn in fns.items()}
    return medians(interleaved_rounds(blocking, repeats))


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns; the first row is the header, underlined."""
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


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


def throughput_fields(prefix: str, flops: float, seconds: float, peak: float, matmul_rate: float = math.nan) -> dict:
    """`{prefix}_flops`, `{prefix}_flop_per_s`, with a known peak `{prefix}_mfu`, and with this
    machine's calibrated matmul rate (`benches.calibration`) `{prefix}_of_matmul_rate`, the
    FLOP/s as a fraction of it."""
    fields = {f"{prefix}_flops": flops, f"{prefix}_flop_per_s": flops / seconds}
    if not math.isnan(peak):
        fields[f"{prefix}_mfu"] = flops / seconds / peak
    if not math.isnan(matmul_rate) and matmul_rate > 0:
        fields[f"{prefix}_matmul_rate"] = matmul_rate
        fields[f"{prefix}_of_matmul_rate"] = flops / seconds / matmul_rate
    return fields


def fmt_flops(flop_per_s: float, matmul_rate: float = math.nan) -> str:
    """`12.3 GFLOP/s`, and with a calibrated matmul rate `12.3 GFLOP/s (41% of matmul)`."""
    if math.isnan(flop_per_s):
        return "n/a"
    text = f"{flop_per_s / 1e9:.1f} GFLOP/s"
    if not math.isnan(matmul_rate) and matmul_rate > 0:
        text += f" ({flop_per_s / matmul_rate:.0%} of matmul)"
    return text

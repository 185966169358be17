"""This machine's own jitted matmul rate at a bench's GEMM shapes, measured in the same run.

A FLOP/s figure only carries to another CPU as a fraction of what that CPU's matmuls reach
at the same shapes (issue 25: two EPYCs of one family differ 2x on the same train step),
so each bench times the dense GEMMs of a transformer layer (TARFlow arXiv:2412.06329, G of
BiFlow arXiv:2512.10953: qkv, attention output, MLP up and down; with the backward pass
each one's input and kernel gradients) and prints its figures against that rate. The
attention's own batched products are not among them: at the benches' sizes the dense
layers carry most of the FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Contraction of each layout: "nn" (m,k)@(k,n); "nt" (m,k)@(n,k)^T, an input gradient dC @ W^T;
# "tn" (k,m)^T@(k,n), a kernel gradient A^T @ dC over the rows.
LAYOUTS = {"nn": (((1,), (0,)), ((), ())), "nt": (((1,), (1,)), ((), ())), "tn": (((0,), (0,)), ((), ()))}


@dataclasses.dataclass(frozen=True)
class Gemm:
    """An (m, k) x (k, n) product stored in `layout`, run `count` times per step."""

    name: str
    m: int
    k: int
    n: int
    layout: str = "nn"
    count: int = 1

    @property
    def flops(self) -> int:
        """Multiply-adds counted as two FLOPs, as XLA's cost analysis counts a dot."""
        return 2 * self.m * self.k * self.n

    @property
    def key(self) -> tuple[int, int, int, str]:
        return self.m, self.k, self.n, self.layout

    def operand_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        m, k, n = self.m, self.k, self.n
        return {"nn": ((m, k), (k, n)), "nt": ((m, k), (n, k)), "tn": ((k, m), (k, n))}[self.layout]


def backward_gemms(g: Gemm) -> list[Gemm]:
    """The two products of C = A B's backward pass: dA = dC B^T and dB = A^T dC (same FLOPs each)."""
    return [Gemm(f"{g.name} dx", g.m, g.n, g.k, "nt", g.count), Gemm(f"{g.name} dW", g.k, g.m, g.n, "tn", g.count)]


def layer_gemms(rows: int, width: int, expansion: int = 4, backward: bool = False) -> list[Gemm]:
    """The dense GEMMs of one transformer layer over `rows` token rows (N*T, or N for one decode step)."""
    forward = [Gemm("qkv", rows, width, 3 * width), Gemm("attn out", rows, width, width),
               Gemm("mlp up", rows, width, expansion * width), Gemm("mlp down", rows, expansion * width, width)]
    if not backward:
        return forward
    return forward + [b for g in forward for b in backward_gemms(g)]


def aggregate_rate(gemms: list[Gemm], seconds: dict[tuple[int, int, int, str], float]) -> float:
    """FLOP/s of the GEMMs run back to back, each `count` times: total FLOPs over total seconds."""
    flops = sum(g.flops * g.count for g in gemms)
    total = sum(seconds[g.key] * g.count for g in gemms)
    return flops / total if total > 0 else math.nan


def _looped(layout: str, dtype: Any):
    """A jitted `reps`-fold product whose every iteration really runs: the operands pass through
    an optimisation barrier with the previous output, so XLA cannot hoist the dot out of the loop."""
    dims = LAYOUTS[layout]

    def run(a, b, out, reps):
        def body(_, carry):
            a, b, out = jax.lax.optimization_barrier(carry)
            return a, b, jax.lax.dot_general(a, b, dims, preferred_element_type=dtype)

        return jax.lax.fori_loop(0, reps, body, (a, b, out))[2]

    return jax.jit(run)


class Calibrator:
    """Times GEMMs once each per dtype (cached by shape), `target_s` of work per timed call."""

    def __init__(self, target_s: float = 0.03, repeats: int = 3, seed: int = 0):
        self.target_s, self.repeats, self.seed = target_s, repeats, seed
        self.seconds: dict[str, dict[tuple[int, int, int, str], float]] = {}
        self.spent_s = 0.0

    def time_gemm(self, g: Gemm, dtype: str) -> float:
        """Median seconds of one product (compile excluded), from a looped run of >= target_s."""
        cache = self.seconds.setdefault(dtype, {})
        if g.key in cache:
            return cache[g.key]
        start = time.perf_counter()
        jdtype = jnp.dtype(dtype)
        rng = np.random.default_rng(self.seed)  # host-side operands: no per-shape compile of a random op
        a, b = (jax.device_put(rng.standard_normal(shape, np.float32).astype(jdtype)) for shape in g.operand_shapes())
        out = jax.device_put(np.zeros((g.m, g.n), jdtype))
        fn = _looped(g.layout, jdtype)
        jax.block_until_ready(fn(a, b, out, 1))  # compile
        t0 = time.perf_counter()
        jax.block_until_ready(fn(a, b, out, 1))
        one = max(time.perf_counter() - t0, 1e-7)
        reps = max(1, min(100_000, math.ceil(self.target_s / one)))
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(a, b, out, reps))
            times.append((time.perf_counter() - t0) / reps)
        cache[g.key] = statistics.median(times)
        self.spent_s += time.perf_counter() - start
        return cache[g.key]

    def rate(self, gemms: list[Gemm], dtype: str) -> float:
        """The aggregate FLOP/s of `gemms` in `dtype` (see `aggregate_rate`)."""
        for g in gemms:
            self.time_gemm(g, dtype)
        return aggregate_rate(gemms, self.seconds[dtype])

    def details(self, gemms: list[Gemm], dtype: str) -> list[dict[str, Any]]:
        """Each GEMM's shape, layout and own FLOP/s, for the JSON."""
        return [{"name": g.name, "m": g.m, "k": g.k, "n": g.n, "layout": g.layout, "count": g.count,
                 "flop_per_s": g.flops / self.time_gemm(g, dtype)} for g in gemms]


def describe(gemms: list[Gemm]) -> str:
    """`4096x128x384, 4096x128x128, ...`: the distinct shapes (m x k x n) of a calibration set."""
    seen: list[str] = []
    for g in gemms:
        text = f"{g.m}x{g.k}x{g.n}"
        if text not in seen:
            seen.append(text)
    return ", ".join(seen)


def calibrate(parts: dict[str, list[Gemm]], dtypes: list[str], target_s: float = 0.03) -> dict[str, Any]:
    """Each part's aggregate matmul rate in each dtype, and every GEMM's own rate, for a bench's JSON."""
    calibrator = Calibrator(target_s)
    rates = {dtype: {part: calibrator.rate(gemms, dtype) for part, gemms in parts.items()} for dtype in dtypes}
    return {"rates": rates, "target_s": target_s, "spent_s": calibrator.spent_s,
            "gemms": {dtype: {part: calibrator.details(gemms, dtype) for part, gemms in parts.items()}
                      for dtype in dtypes}}


def calibration_lines(parts: dict[str, list[Gemm]], calibration: dict[str, Any]) -> list[str]:
    """One header line per part: its GEMM shapes and the rate they reach here, per dtype."""
    lines = []
    for part, gemms in parts.items():
        rates = ", ".join(f"{dtype} {calibration['rates'][dtype][part] / 1e9:.1f} GFLOP/s"
                          for dtype in calibration["rates"])
        lines.append(f"matmul rate for {part} ({len(gemms)} GEMMs m x k x n: {describe(gemms)}): {rates}")
    lines.append(f"(jitted GEMMs timed in this run, {calibration['spent_s']:.1f} s; a FLOP/s figure's % is "
                 "of its part's rate)")
    return lines


class GemmPass:
    """A part's GEMMs as one timed task of a bench's interleaved rounds: each GEMM runs `reps`
    times its `count`, so a round's matmul rate is measured beside the step it calibrates,
    under the same load (a rate taken once, before or after the rounds, drifts with the host).

    `side` "xla" runs our jitted products (`_looped`), "torch" runs torch.matmul on the same
    shapes and layouts (torch's threads as the caller set them): the anchor's own GEMM rate, so
    a step ratio between the two can be read against the ratio of what their matmuls reach.
    """

    def __init__(self, gemms: list[Gemm], side: str = "xla", dtype: str = "float32", target_s: float = 0.03,
                 seed: int = 0):
        if side not in ("xla", "torch"):
            raise ValueError(f"side must be 'xla' or 'torch', got {side!r}")
        self.gemms, self.side = gemms, side
        rng = np.random.default_rng(seed)
        self.operands = []
        for g in gemms:
            a, b = (rng.standard_normal(shape, np.float32) for shape in g.operand_shapes())
            if side == "xla":
                jdtype = jnp.dtype(dtype)
                self.operands.append((_looped(g.layout, jdtype), jax.device_put(a.astype(jdtype)),
                                      jax.device_put(b.astype(jdtype)), jax.device_put(np.zeros((g.m, g.n), jdtype))))
            else:
                import torch

                product = {"nn": lambda a, b: a @ b, "nt": lambda a, b: a @ b.T, "tn": lambda a, b: a.T @ b}[g.layout]
                self.operands.append((product, torch.from_numpy(a), torch.from_numpy(b), None))
        self.reps = 1
        self()  # compile (xla) / warm up (torch)
        start = time.perf_counter()
        self()
        self.reps = max(1, math.ceil(target_s * len(gemms) / max(time.perf_counter() - start, 1e-7)))

    @property
    def flops(self) -> int:
        """FLOPs of one call: every GEMM `reps` x `count` times."""
        return self.reps * sum(g.flops * g.count for g in self.gemms)

    def products(self) -> list[np.ndarray]:
        """Each GEMM's product once, as numpy: the check that both sides compute the same thing."""
        if self.side == "xla":
            return [np.asarray(fn(a, b, out, 1)) for fn, a, b, out in self.operands]
        return [fn(a, b).numpy() for fn, a, b, _ in self.operands]

    def __call__(self) -> None:
        for g, (fn, a, b, out) in zip(self.gemms, self.operands):
            reps = self.reps * g.count
            if self.side == "xla":
                jax.block_until_ready(fn(a, b, out, reps))
            else:
                for _ in range(reps):
                    fn(a, b)

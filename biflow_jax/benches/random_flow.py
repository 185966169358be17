"""A random-init flow whose transform really depends on its context, for benches and tests.

TARFlow (arXiv:2412.06329) zero-initialises each block's output projection, so at init the
affine parameters (a, b) ignore x and every inverse solver is trivially exact (Jacobi stops
after one step): timing or testing solvers needs those kernels perturbed.
"""

from __future__ import annotations

from typing import Any

import jax


def perturb_proj_out(params: Any, rng: jax.Array, scale: float = 0.02) -> Any:
    """Replace every block's zero-initialised proj_out kernel by N(0, scale^2) noise."""
    inner = dict(params["params"])
    for i, name in enumerate(sorted(k for k in inner if k.startswith("blocks_"))):
        block = dict(inner[name])
        proj_out = dict(block["proj_out"])
        kernel = proj_out["kernel"]
        proj_out["kernel"] = scale * jax.random.normal(jax.random.fold_in(rng, i), kernel.shape, kernel.dtype)
        block["proj_out"] = proj_out
        inner[name] = block
    return {**params, "params": inner}

"""`python -m biflow_jax.bench compile`: how long XLA takes to compile a flow's train step.

The step (forward + backward + AdamW, `nll_step`) is lowered and compiled from abstract
arguments, so no parameter is ever materialised, once per layer layout: layers unrolled or
under nn.scan, each with or without remat.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from biflow_jax import config_files
from biflow_jax.benches import nll_step
from biflow_jax.benches.timing import print_table
from biflow_jax.models.param_trees import count_params
from biflow_jax.models.tarflow import build_flow


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/imagenet64.py:p4", help="a config file, optionally FILE:ARG")
    parser.add_argument("--batch", type=int, default=0, help="0: the config's train batch size")
    parser.add_argument("--variants", default="unrolled,scan",
                        help="comma-separated: unrolled, scan, unrolled_remat, scan_remat (remat = 'dots')")
    parser.add_argument("--repeats", type=int, default=1, help="compiles per variant (in-process caches cleared)")


def run(args: argparse.Namespace) -> dict:
    """Seconds to lower and to compile the flow's train step (forward + backward + AdamW) from
    abstract arguments (no parameter is ever materialised), per layer layout."""
    config = config_files.load(args.config)
    m = config.model
    batch = args.batch or config.train.batch_size
    variants = {"unrolled": (False, "none"), "scan": (True, "none"),
                "unrolled_remat": (False, "dots"), "scan_remat": (True, "dots")}
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    optimizer = nll_step.adamw()
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
            return nll_step.nll_step(model, optimizer, p, o, x, y)

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

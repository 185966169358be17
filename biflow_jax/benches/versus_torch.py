"""`python -m biflow_jax.bench versus_torch`: our flow next to apple/ml-tarflow's PyTorch Model.

TARFlow (arXiv:2412.06329) has a public PyTorch implementation; with `--reference` naming a
folder that holds its transformer_flow.py (imported at run time, never copied), both sides
get the same weights, config and batch, must agree on the forward pass and the samples,
and are timed in interleaved rounds. Without it our side is timed alone.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from biflow_jax import host_memory
from biflow_jax.benches import calibration, nll_step
from biflow_jax.benches.machine import usable_cores
from biflow_jax.benches.random_flow import perturb_proj_out
from biflow_jax.benches.timing import (
    compiled_flops,
    fmt_flops,
    interleaved_rounds,
    medians,
    peak_flops,
    print_table,
    throughput_fields,
)
from biflow_jax.models.param_trees import count_params
from biflow_jax.models.tarflow import TARFlow, build_flow
from biflow_jax.samplers import exact_inverse

# With the batch split over one CPU device per core, each device's program runs its Eigen contractions
# (the kernel gradients and attention's transposed batched dots, which XLA keeps out of YNNPACK) on its
# own thread instead of handing them to the intra-op pool the other device's program is using. On a
# 2-core Sapphire Rapids Xeon the split step was 1.13x the one-device step with the pool, 1.20x without
# it (paired rounds; docs/tarflow.md).
ONE_PROGRAM_PER_CORE = {"xla_cpu_multi_thread_eigen": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core this process may use)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds; figures are medians")
    parser.add_argument("--train_steps", type=int, default=2, help="train steps per timed round")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: train,forward,sample,cfg")
    parser.add_argument("--proj_out_scale", type=float, default=0.02,
                        help="std of the random proj_out kernels, so sampling depends on the context")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="peak TFLOP/s per device for MFU (0: a known accelerator's, none on CPU)")
    parser.add_argument("--calibration_s", type=float, default=0.03,
                        help="seconds of work per timed call when calibrating this machine's matmul rate at the "
                             "flow's GEMM shapes (0 skips the calibration)")
    parser.add_argument("--cpu_devices", type=int, default=1,
                        help="split our side's batch over this many CPU devices of this host (jax_num_cpu_devices), "
                             "params replicated: XLA:CPU runs a batched dot, such as attention's, on one thread, "
                             "and one program per device keeps every core busy; each device's Eigen dots then run "
                             "single-threaded (0: one per core this process may use)")
    parser.add_argument("--seed", type=int, default=0)


def load_reference(folder: str):
    """ml-tarflow's transformer_flow module, imported from `folder` (never copied into this repo)."""
    import importlib.util

    path = os.path.join(folder, "transformer_flow.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--reference={folder!r} has no transformer_flow.py")
    spec = importlib.util.spec_from_file_location("_ml_tarflow_transformer_flow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_device_count(args: argparse.Namespace) -> int:
    count = args.cpu_devices or usable_cores()
    if args.batch % count:
        raise ValueError(f"--batch={args.batch} does not split over --cpu_devices={count}")
    return count


def before_jax(args: argparse.Namespace) -> None:
    """Ask JAX for `--cpu_devices` CPU devices; before its backend starts (the machine line starts it)."""
    count = cpu_device_count(args)
    if count > 1:
        jax.config.update("jax_num_cpu_devices", count)


def run(args: argparse.Namespace) -> dict:
    """Images/s of the train step (forward + backward + AdamW), the forward pass, and the exact
    inverse without and with CFG: ours (jitted) next to ml-tarflow's PyTorch Model, same weights,
    same config and batch, timed in interleaved rounds (a fresh random order each round), medians."""
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    cpu_devices = cpu_device_count(args)
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

    optimizer = nll_step.adamw()
    step = jax.jit(lambda p, o, x, y: nll_step.nll_step(model, optimizer, p, o, x, y), donate_argnums=(0, 1))
    forward = jax.jit(lambda p, x, y: model.apply(p, x, y).z)
    state = {"params": jax.tree_util.tree_map(jnp.copy, params), "opt": optimizer.init(params)}

    # Model FLOPs from XLA's cost analysis. With nn.scan the layer loop body would count once,
    # so the counts always come from the unrolled model (the same math).
    flop_model = build_flow({**cfg, "scan_layers": False, "remat": "none"})
    flop_params = model_params_unstacked(model, params)
    flop_forward = jax.jit(lambda p, x, y: flop_model.apply(p, x, y).z)
    train_flops = compiled_flops(jax.jit(lambda p, o, x, y: nll_step.nll_step(flop_model, optimizer, p, o, x, y)),
                                 flop_params, optimizer.init(flop_params), images, labels)
    forward_flops = compiled_flops(flop_forward, flop_params, images, labels)
    sample_flops = forward_flops
    cfg_flops = compiled_flops(flop_forward, flop_params, jnp.concatenate([images, images]),
                               None if labels is None else jnp.concatenate([labels, jnp.full_like(labels, -1)]))
    peak = peak_flops(args.dtype, args.peak_tflops)
    if cpu_devices > 1:  # our side's batch over the host's CPU devices, params and optimizer state replicated
        mesh = Mesh(np.array(jax.devices()[:cpu_devices]), ("data",))
        replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        params, state = jax.device_put(params, replicated), jax.device_put(state, replicated)
        images, z = jax.device_put(images, split), jax.device_put(z, split)
        labels = None if labels is None else jax.device_put(labels, split)
        step = jax.jit(lambda p, o, x, y: nll_step.nll_step(model, optimizer, p, o, x, y), donate_argnums=(0, 1),
                       out_shardings=replicated,  # the next step's inputs as this one's: one compiled program
                       compiler_options=ONE_PROGRAM_PER_CORE)
        forward = jax.jit(lambda p, x, y: model.apply(p, x, y).z, compiler_options=ONE_PROGRAM_PER_CORE)

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
        torch_threads = args.threads or usable_cores()
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
    # This machine's own matmul rate at the step's GEMMs, so the FLOP/s carry to other machines:
    # train and forward over the N*T token rows; a decode step of the exact inverse over N rows (2N with CFG).
    # Timed as tasks of the same interleaved rounds as the steps (ours, and with --reference torch's
    # matmul on the same shapes), so a rate and the step it calibrates see the same load.
    rows, width = n * model.num_tokens, args.channels
    parts = {"train": calibration.layer_gemms(rows, width, backward=True),
             "forward": calibration.layer_gemms(rows, width),
             "sample": calibration.layer_gemms(n, width), "cfg": calibration.layer_gemms(2 * n, width)}
    parts = {part: gemms for part, gemms in parts.items() if f"ours_{part}" in tasks}
    passes: dict[str, calibration.GemmPass] = {}
    if args.calibration_s > 0:
        for part, gemms in parts.items():
            passes[f"ours_matmul_{part}"] = calibration.GemmPass(gemms, "xla", args.dtype, args.calibration_s)
            if args.reference:
                passes[f"torch_matmul_{part}"] = calibration.GemmPass(gemms, "torch", "float32", args.calibration_s)
    rounds = interleaved_rounds({**tasks, **passes}, args.rounds, seed=args.seed,
                                calls={name: args.train_steps for name in tasks if name.endswith("_train")})
    seconds = medians(rounds)
    matmul_rates = {name: fn.flops / seconds[name] for name, fn in passes.items()}
    calib = (calibration.calibrate(parts, sorted({"float32", args.dtype}), args.calibration_s)
             if args.calibration_s > 0 else None)
    rate = {part: matmul_rates.get(f"ours_matmul_{part}", math.nan) for part in parts}
    torch_rate = {part: matmul_rates.get(f"torch_matmul_{part}", math.nan) for part in parts}

    flops = {"train": train_flops, "forward": forward_flops, "sample": sample_flops, "cfg": cfg_flops}
    result: dict[str, Any] = {
        "device": jax.devices()[0].device_kind, "devices": cpu_devices, "batch": n,
        "config": {k: v for k, v in cfg.items()}, "cache_dtype": args.cache_dtype or args.dtype,
        "params": count_params(params), "torch_threads": torch_threads, "reference": args.reference or None,
        "cfg_scale": args.guidance, "rounds": args.rounds, "peak_flop_per_s": peak,
        "host_memory_kept": host_memory.kept(), "calibration": calib,
        "ours_compiler_options": ONE_PROGRAM_PER_CORE if cpu_devices > 1 else {},
        "matmul_rate_in_rounds": {"ours": {part: rate[part] for part in parts},
                                  "torch": {part: torch_rate[part] for part in parts} if args.reference else None},
    }
    table = [("part", "ours s", "ours img/s", "ours FLOP/s", "torch s", "torch FLOP/s", "ours/torch",
              "paired")]
    for part in ("train", "forward", "sample", "cfg"):
        ours = seconds.get(f"ours_{part}")
        if ours is None:
            continue
        result[f"ours_{part}_s"] = ours
        result[f"ours_{part}_images_per_s"] = n / ours
        result.update(throughput_fields(f"ours_{part}", flops[part], ours, peak, rate[part]))
        theirs = seconds.get(f"torch_{part}")
        row = [part, f"{ours:.4f}", f"{n / ours:.2f}", fmt_flops(flops[part] / ours, rate[part])]
        if theirs is not None:
            # The same model FLOPs (XLA's count) on both sides; torch's % is of torch's own matmul rate.
            paired = statistics.median(t / o for t, o in zip(rounds[f"torch_{part}"], rounds[f"ours_{part}"]))
            result[f"torch_{part}_s"] = theirs
            result[f"torch_{part}_images_per_s"] = n / theirs
            result.update(throughput_fields(f"torch_{part}", flops[part], theirs, math.nan, torch_rate[part]))
            result[f"{part}_ratio"] = theirs / ours
            result[f"{part}_ratio_paired"] = paired
            row += [f"{theirs:.4f}", fmt_flops(flops[part] / theirs, torch_rate[part]), f"{theirs / ours:.2f}x",
                    f"{paired:.2f}x"]
        else:
            row += ["-", "-", "-", "-"]
        table.append(tuple(row))
    result.update(parity)
    result["per_round_s"] = rounds
    print(f"device: {result['device']} x{cpu_devices}" + (" (our batch split over them)" if cpu_devices > 1 else "")
          + f"; ours {args.dtype} "
          f"(scan_layers={args.scan_layers}, remat={args.remat}, cache {result['cache_dtype']}); "
          f"{side}x{side}x{channels}, patch {args.patch}, width {args.channels}, {args.blocks} blocks x "
          f"{args.layers} layers, {args.classes} classes, batch {n}, {result['params']:,} params; "
          f"torch threads {torch_threads}; CFG scale {args.guidance}; medians of {args.rounds} interleaved rounds; "
          f"host malloc keeps freed memory (both sides, one process): {host_memory.kept()}")
    for part, gemms in parts.items():
        if not math.isnan(rate[part]):
            line = (f"matmul rate for {part} ({len(gemms)} GEMMs m x k x n: {calibration.describe(gemms)}), timed in "
                    f"the rounds: ours (XLA) {rate[part] / 1e9:.1f} GFLOP/s")
            if not math.isnan(torch_rate[part]):
                ratio = torch_rate[part] / rate[part]
                line += f", torch {torch_rate[part] / 1e9:.1f} GFLOP/s (torch/ours {ratio:.2f}x on the same GEMMs)"
            print(line)
    print_table(table)
    if args.reference:
        print("ours/torch: ratio of the median seconds; paired: median over rounds of each round's ratio. "
              "A FLOP/s % is of that side's own matmul rate in the rounds, so the two sides' %s compare "
              "how much of its machine's matmul speed each step reaches")
    if parity:
        print("same weights, ours vs torch: " + ", ".join(f"{k} {v:.2e}" for k, v in parity.items()))
    if math.isnan(peak):
        print("MFU omitted: no known peak for this device (pass --peak_tflops)")
    return result


def model_params_unstacked(model: TARFlow, params: Any) -> Any:
    """The per-layer params tree (the export layout) of a flow, whether or not it scans its layers."""
    if getattr(model, "scan_layers", False):
        from biflow_jax.models.param_trees import unstack_layer_params

        return unstack_layer_params(params)
    return params

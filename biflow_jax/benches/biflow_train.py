"""`python -m biflow_jax.bench biflow_train`: stage 2's step with and without the perceptual terms.

BiFlow (arXiv:2512.10953) adds LPIPS-VGG and ConvNeXt-V2-Base distances on 224-px crops of
G's final image. This times the jitted stage-2 train step (`trainer.make_train_step`: frozen
flow trajectory, G forward/backward with training-time CFG, AdamW, EMA) plain, with each
term, with both, and with both under remat, random-init networks of the real architectures.
Variants run in interleaved rounds (a fresh order each round) so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from biflow_jax.benches.timing import interleaved_rounds, medians, print_table

VARIANTS = {"plain": (), "lpips": ("lpips",), "convnext": ("convnext",), "both": ("lpips", "convnext"),
            "both_remat": ("lpips", "convnext")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/digits.py", help="the config whose stage-2 settings are used")
    parser.add_argument("--img_size", type=int, default=32, help="RGB image side of the frozen flow and G")
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--flow_width", type=int, default=256)
    parser.add_argument("--flow_blocks", type=int, default=4)
    parser.add_argument("--flow_layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=384, help="G's width (B/2: 768)")
    parser.add_argument("--depth", type=int, default=12, help="G's depth (B/2: 12)")
    parser.add_argument("--heads", type=int, default=6, help="G's heads (B/2: 12)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=112, help="perceptual crop side (the paper: 224)")
    parser.add_argument("--convnext", default="base", choices=["base", "tiny-test"], help="ConvNeXt-V2 size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="G's and the perceptual networks' compute dtype")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=1, help="train steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)


def run(args: argparse.Namespace) -> dict:
    """Seconds per stage-2 step for each variant and each one's ratio over the plain step."""
    import jax.numpy as jnp

    from biflow_jax import config_files, optim, runs, sharding, trainer
    from biflow_jax.models import registry
    from biflow_jax.models.convnext import ConvNeXtV2, convnext_config
    from biflow_jax.models.param_trees import count_params
    from biflow_jax.models.vgg import LPIPS
    from biflow_jax.objectives import biflow, perceptual

    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown or "plain" not in chosen:
        raise ValueError(f"--variants must include 'plain' and name only {list(VARIANTS)}; got {chosen}")
    config = config_files.load(args.config)
    config.stage = "biflow"
    config.data.update(image_size=args.img_size, channels=3)
    config.model.update(img_size=args.img_size, in_channels=3, patch_size=args.patch, channels=args.flow_width,
                        num_blocks=args.flow_blocks, layers_per_block=args.flow_layers, head_dim=64)
    config.biflow.model.update(variant="B/2", depth=args.depth, width=args.width, heads=args.heads, dtype=args.dtype)
    config.biflow.train.update(batch_size=args.batch, steps=1000)
    config.biflow.perceptual.update(crop_size=args.crop, dtype=args.dtype)

    flow = registry.build_flow(config.model)
    flow_params = flow.init(jax.random.key(1), *registry.flow_example_inputs(config.model))
    flow_run = runs.FlowRun("in-memory", config, flow, flow_params, 0)
    net_dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    crop = jnp.zeros((1, args.crop, args.crop, 3))
    convnext = ConvNeXtV2(convnext_config(args.convnext), dtype=net_dtype)
    net_params = {"lpips": LPIPS().init(jax.random.key(2), crop, crop)["params"],
                  "convnext": convnext.init(jax.random.key(3), crop)["params"]}
    distances = {"lpips": perceptual.lpips_distance(net_dtype), "convnext": perceptual.convnext_distance(convnext)}
    weights = {"lpips": 0.4, "convnext": 0.1}
    weighting = lambda d: biflow.adaptive_weight(d, config.biflow.adaptive_p, config.biflow.adaptive_c)  # noqa: E731

    mesh = sharding.make_mesh()
    optimizer = optim.make_optimizer(config.biflow.optim, config.biflow.train.steps)
    rng = np.random.default_rng(0)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.AXIS))
    batch = sharding.to_global({
        "image": rng.integers(0, 256, (args.batch, args.img_size, args.img_size, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, (args.batch,)).astype(np.int32)}, batch_sharding)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    steps, states, frozen, compile_s = {}, {}, {}, {}
    for name in chosen:
        terms = VARIANTS[name]
        built = None
        if terms:
            loss = perceptual.PerceptualLoss(tuple(perceptual.Term(t, weights[t], distances[t]) for t in terms),
                                             crop_size=args.crop, weighting=weighting, remat=name.endswith("remat"))
            built = (loss, {t: net_params[t] for t in terms})
        objective = biflow.make(config, flow_run, perceptual_terms=built)
        steps[name] = trainer.make_train_step(objective.loss, optimizer, config.biflow.train, config.parallel, mesh)
        frozen[name] = jax.device_put(objective.frozen, replicated)
        state = steps[name].to_backend(trainer.init_state(objective, optimizer, 0, config.parallel, mesh))
        start = time.perf_counter()
        state, _ = steps[name](state, batch, frozen[name])  # compile + first step
        jax.block_until_ready(state)
        compile_s[name] = time.perf_counter() - start
        states[name] = state

    def run_steps(name: str) -> None:
        for _ in range(args.steps):
            states[name], _ = steps[name](states[name], batch, frozen[name])
        jax.block_until_ready(states[name])

    rounds = interleaved_rounds({name: (lambda name=name: run_steps(name)) for name in chosen}, args.rounds,
                                calls={name: args.steps for name in chosen})
    seconds = medians(rounds)
    g_params = count_params(jax.eval_shape(biflow.make(config, flow_run).init, jax.random.key(0)))
    result = {
        "device": jax.devices()[0].device_kind, "batch": args.batch, "img_size": args.img_size,
        "tokens": flow.num_tokens, "g_width": args.width, "g_depth": args.depth, "g_params": g_params,
        "flow_blocks": args.flow_blocks, "flow_layers": args.flow_layers, "flow_width": args.flow_width,
        "crop": args.crop, "convnext": args.convnext, "dtype": args.dtype,
        "lpips_params": count_params(net_params["lpips"]), "convnext_params": count_params(net_params["convnext"]),
        "rounds": args.rounds, "steps_per_round": args.steps, "per_round_s": rounds, "first_step_s": compile_s,
    }
    for name in chosen:
        result[f"{name}_step_s"] = seconds[name]
        if name != "plain":
            result[f"ratio_{name}"] = seconds[name] / seconds["plain"]
    print(f"device: {result['device']}; G width {args.width} depth {args.depth} ({g_params:,} params) over "
          f"{flow.num_tokens} tokens of a {args.img_size}px RGB image; flow {args.flow_blocks}x{args.flow_layers} "
          f"width {args.flow_width}; batch {args.batch}; crops {args.crop}px; LPIPS-VGG16 + ConvNeXt-V2 "
          f"{args.convnext} (random init), {args.dtype}")
    rows = [("variant", "s/step (median)", "vs plain", "first step s")]
    for name in chosen:
        rows.append((name, f"{seconds[name]:.3f}", f"{seconds[name] / seconds['plain']:.2f}x",
                     f"{compile_s[name]:.1f}"))
    print_table(rows)
    return result

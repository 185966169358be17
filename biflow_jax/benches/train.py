"""`python -m biflow_jax.bench train`: the R-REPA alignment's cost over the plain NLL step.

R-REPA (arXiv:2511.22345) aligns the flow's hidden states, read in reverse, with a frozen
DINOv2's features. This times the trainer's jitted step NLL alone, with the alignment
against a constant teacher (the alignment's own cost) and against a random-init DINOv2
(what a run pays), and the encoder's forward pass alone.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax.benches.timing import interleaved_rounds, medians, print_table
from biflow_jax.models.param_trees import count_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> dict:
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
    rounds = interleaved_rounds({name: (lambda name=name: run_steps(name)) for name in names}, args.rounds,
                                calls={name: args.steps for name in names})
    seconds = medians(rounds)
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

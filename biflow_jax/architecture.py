"""The architecture's arithmetic and options: widths, layer counts, option defaults and checks, dtypes.

Plain Python on purpose (no JAX, no torch, no numpy): the Flax models, the numpy-only
state_dict layouts, the PyTorch ports, the config checks and `describe` all read these facts
here, so an exported file and the model it came from cannot disagree about a hidden width or
a stage split. The flow is TARFlow (Zhai et al., arXiv:2412.06329) with STARFlow's options
(arXiv:2506.06276); G is BiFlow's reverse model (arXiv:2512.10953).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Compute dtypes of the flow and of G. float64 is the parity and debugging dtype: it needs
# jax_enable_x64 (checked where a config is validated), training runs use float32 or bfloat16.
DTYPES = ("float32", "bfloat16", "float64")

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "geglu_starflow")
GATED_MLPS = ("swiglu", "geglu_starflow")  # three matmuls: gate, up, down
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

# The optional `config.model` keys of the flow and their defaults (apple/ml-tarflow's model):
# a run saved before a key existed is read with its default.
FLOW_OPTION_DEFAULTS: dict[str, Any] = dict(scan_layers=False, remat="none", rope=False, norm="layernorm",
                                            qk_norm=False, mlp="gelu", block_layers=(), clip_shift=False)

# Norm epsilons: the flow's follow torch's LayerNorm default, G's the ViT/DiT convention.
FLOW_NORM_EPS = 1e-5
REVERSE_NORM_EPS = 1e-6

# 2D axial RoPE (RoFormer, arXiv:2104.09864). The flow pairs channels within each axis half
# (head = [r1, r2, c1, c2], pairs (r1, r2) and (c1, c2)); G pairs (j, j + head_dim/2) with
# the row angles in the first quarter of each half. G's grid is a few dozen tokens wide at
# most, hence its small base.
ROPE_PAIRINGS = ("axis_halves", "half_turn")
FLOW_ROPE = dict(base=10000.0, pairing="axis_halves")
REVERSE_ROPE = dict(base=100.0, pairing="half_turn")


def swiglu_hidden(width: int, ratio: float) -> int:
    """A SwiGLU MLP's hidden width (Shazeer, arXiv:2002.05202): 2/3 of the GELU MLP's `ratio * width`
    (the same parameter count), truncated to an integer and rounded up to a multiple of 8.

    (For the flow's integer expansion this equals the multiple of 8 at or above 2/3 e C whenever
    the width is even, which every head_dim makes it.)"""
    return -(-int(2 * ratio * width / 3) // 8) * 8


def mlp_hidden(mlp: str, width: int, expansion: float) -> int:
    """The hidden width of the flow's MLP of kind `mlp`: ours `swiglu_hidden`, STARFlow's gated MLP
    and the GELU MLP `width * expansion`."""
    return swiglu_hidden(width, expansion) if mlp == "swiglu" else int(width * expansion)


def block_flipped(index: int) -> bool:
    """Whether flow block `index` (0-indexed, forward order) reverses the token order: the odd ones."""
    return bool(index % 2)


def check_dtype(name: str, key: str) -> str:
    """`name` if it is one of `DTYPES`; else ValueError naming `key`."""
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r} must be one of {DTYPES}")
    return name


def check_flow_options(num_blocks: int, head_dim: int, rope: bool, norm: str, mlp: str,
                       block_layers: Sequence[int], remat: str = "none") -> None:
    """Raise ValueError naming the `model.*` key of an unusable improved-flow option."""
    if norm not in NORMS:
        raise ValueError(f"model.norm must be one of {NORMS}, got {norm!r}")
    if mlp not in MLPS:
        raise ValueError(f"model.mlp must be one of {MLPS}, got {mlp!r}")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {remat!r}")
    if rope and head_dim % 4:
        raise ValueError(f"model.rope needs model.head_dim divisible by 4 (2D RoPE), got {head_dim}")
    if block_layers and (len(block_layers) != num_blocks or min(block_layers) < 1):
        raise ValueError(f"model.block_layers must give num_blocks={num_blocks} positive layer counts, "
                         f"got {tuple(block_layers)}")


def flow_options(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The option values of a `config.model` section (defaults for keys an older config lacks),
    normalised (bools, `block_layers` a tuple of ints as given) and checked."""
    options = {key: model_cfg.get(key, default) for key, default in FLOW_OPTION_DEFAULTS.items()}
    for key in ("scan_layers", "rope", "qk_norm", "clip_shift"):
        options[key] = bool(options[key])
    options["remat"] = options["remat"] or "none"
    options["norm"] = options["norm"] or "layernorm"
    options["mlp"] = options["mlp"] or "gelu"
    options["block_layers"] = tuple(int(n) for n in (options["block_layers"] or ()))
    check_flow_options(model_cfg["num_blocks"], model_cfg["head_dim"], options["rope"], options["norm"],
                       options["mlp"], options["block_layers"], options["remat"])
    return options


def layer_counts(num_blocks: int, layers_per_block: int, block_layers: Sequence[int] = ()) -> tuple[int, ...]:
    """Layers of each flow block in forward order: `block_layers` (STARFlow's deep-shallow flow) or
    `layers_per_block` for every block."""
    return tuple(int(n) for n in block_layers) or (int(layers_per_block),) * num_blocks


def flow_layer_counts(model_cfg: Mapping[str, Any]) -> tuple[int, ...]:
    """`layer_counts` of a checked `config.model` section."""
    return layer_counts(model_cfg["num_blocks"], model_cfg["layers_per_block"], flow_options(model_cfg)["block_layers"])


def options_in_use(model_cfg: Mapping[str, Any]) -> list[str]:
    """The improved-flow options a flow uses, by name (rope, rmsnorm, qk_norm, swiglu, geglu_starflow,
    block_layers=[...], clip_shift): what apple/ml-tarflow's model lacks. Empty for its architecture."""
    options = flow_options(model_cfg)
    used = [name for name, on in (("rope", options["rope"]), ("rmsnorm", options["norm"] == "rmsnorm"),
                                  ("qk_norm", options["qk_norm"]), ("swiglu", options["mlp"] == "swiglu"),
                                  ("geglu_starflow", options["mlp"] == "geglu_starflow")) if on]
    counts = flow_layer_counts(model_cfg)
    if len(set(counts)) > 1 or counts[0] != model_cfg["layers_per_block"]:
        used.append(f"block_layers={list(counts)}")
    if options["clip_shift"]:
        used.append("clip_shift")
    return used


def stage_sizes(depth: int, num_forward_blocks: int, layers_per_stage: Sequence[int] | None = None) -> tuple[int, ...]:
    """G's layers per stage, B + 1 stages: `layers_per_stage` if given, else `depth` split evenly with
    the spare layers going to the first (noise-side) stages."""
    num_stages = num_forward_blocks + 1
    if layers_per_stage is not None:
        sizes = tuple(int(s) for s in layers_per_stage)
        if len(sizes) != num_stages or min(sizes) < 1:
            raise ValueError(f"layers_per_stage={sizes} must list {num_stages} positive layer counts "
                             f"(num_forward_blocks + 1)")
        return sizes
    if depth < num_stages:
        raise ValueError(f"depth={depth} is smaller than the number of stages {num_stages}; every stage needs a layer")
    base, extra = divmod(depth, num_stages)
    return tuple(base + (k < extra) for k in range(num_stages))

"""Model FLOPs per image from the architecture alone: the yardstick compiled FLOPs are read against.

Counted as every paper on Transformers counts them: 2 x multiply-adds of every matmul
(projections, MLPs, and attention's QK^T and PV over all T x T pairs even where the causal
mask hides half of them), nothing for elementwise work. A train step costs 3x the forward
of what is trained (forward, and backward to activations and to weights).
"""

from __future__ import annotations

from typing import Any

from biflow_jax import architecture


def transformer_layer(tokens: int, width: int, mlp_hidden: int, gated: bool) -> float:
    """One pre-norm layer: qkv, attention (QK^T, PV), out projection, MLP (two or, gated, three matmuls)."""
    projections = 2 * tokens * width * (3 * width + width)
    attention = 2 * 2 * tokens * tokens * width
    mlp = 2 * tokens * width * mlp_hidden * (3 if gated else 2)
    return float(projections + attention + mlp)


def flow_forward(model: Any) -> float:
    """TARFlow's forward (`models.tarflow.TARFlow`): per block proj_in, its layers, proj_out."""
    t, c, d = model.num_tokens, model.channels, model.token_dim
    gated = model.mlp in architecture.GATED_MLPS
    hidden = architecture.mlp_hidden(model.mlp, c, model.expansion)
    layers = architecture.layer_counts(model.num_blocks, model.layers_per_block, model.block_layers)
    per_block = [2 * t * d * c + n * transformer_layer(t, c, hidden, gated) + 2 * t * c * 2 * d for n in layers]
    return float(sum(per_block))


def reverse_forward(model: Any) -> float:
    """BiFlow's G (`models.reverse.ReverseViT`): embedding, depth SwiGLU layers, a head per stage,
    the re-embedding between stages with `stage_bottleneck` (adaLN modulation is per image: negligible)."""
    t, w, d = model.num_tokens, model.width, model.token_dim
    hidden = architecture.swiglu_hidden(w, model.mlp_ratio)
    stages = model.num_forward_blocks + 1
    return float(2 * t * d * w + model.depth * transformer_layer(t, w, hidden, True) + stages * 2 * t * w * d
                 + (stages - 1) * 2 * t * d * w * bool(model.stage_bottleneck))

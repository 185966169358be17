"""BiFlow's reverse model G: noise tokens -> image tokens in one forward pass (1 NFE).

G is a bidirectional (non-causal) ViT over the forward flow's tokens. Its layers are
grouped into B + 1 stages run in generation order: stage k (k = 0..B-1) ends with a
projection head whose output is aligned with the forward state x^{B-1-k}, so stage
B-1 predicts x^0 (the noised image tokens); the extra stage B is the learned
denoiser that predicts the clean image (arXiv:2512.10953).

Design choices, and why:
- Positions: a fixed 2D sin-cos embedding added to the input *and* 2D rotary
  embeddings on q/k. The input is pure noise, so nothing in it says where a token
  sits; an absolute code is required for position-dependent image structure. RoPE
  adds a relative-offset bias inside every attention layer at no parameter cost and
  keeps working if the token grid changes. Both are parameter-free.
- Conditioning through adaLN-zero (DiT): the class label and the guidance scale w
  become one vector c that produces a shift/scale/gate per block. Training-time CFG
  makes w a continuous input of a 1-NFE model, so it must steer every layer; a
  per-block modulation from one vector is cheaper than in-context condition tokens,
  which every attention layer would have to carry next to the 256 image tokens, and
  the zero-initialised gates make every block start as the exact identity.
- Stage split: `layers_per_stage`, or `depth` split evenly with the spare layers
  going to the first (noise-side) stages.
- Modern blocks: RMSNorm (computed in float32), QK-norm per head (bounded attention
  logits in bf16), SwiGLU MLP with hidden width 2/3 * mlp_ratio * width so the MLP
  costs the same as a GELU MLP of ratio mlp_ratio.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from biflow_jax import architecture
from biflow_jax.models.layers import Attention, GatedMLP, dense, layer_norm, make_norm, rope_tables

Array = jax.Array


@struct.dataclass
class ReverseOutput:
    """What G returns.

    stage_outputs: B + 1 token arrays (N, T, D), float32, generation order; entry k < B
      is paired with the forward state x^{B-1-k}, entry B is the clean-image estimate.
    image_tokens: stage_outputs[-1].
    hiddens: G's hidden state (N, T, width) at the end of every stage (diagnostics).
    """

    stage_outputs: tuple[Array, ...]
    image_tokens: Array
    hiddens: tuple[Array, ...]


def sincos_2d_positions(grid: int, width: int) -> np.ndarray:
    """Fixed (grid*grid, width) absolute positions: half the channels code the row, half the column."""
    if width % 4:
        raise ValueError(f"width={width} must be a multiple of 4 for 2D sin-cos positions")
    quarter = width // 4
    freqs = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord[:, None] * freqs[None]
        parts += [np.sin(angles), np.cos(angles)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def guidance_frequencies(w: Array, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> Array:
    """DiT-style sinusoidal code of the guidance scale (N,) -> (N, dim); w is scaled like a diffusion step."""
    half = dim // 2
    # Computed in float64 and rounded once, so every backend (and the PyTorch port) gets the same table.
    freqs = jnp.asarray(np.exp(-math.log(max_period) * np.arange(half) / half).astype(np.float32))
    args = (jnp.asarray(w, jnp.float32) * scale)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    return x * (1 + scale) + shift


def rms_normalize(x: Array) -> Array:
    """Scale-free RMS normalisation (in float32), what adaLN then modulates."""
    return layer_norm(x, make_norm("rmsnorm", x.dtype, eps=architecture.REVERSE_NORM_EPS, use_scale=False))


class ReverseBlock(nn.Module):
    """One transformer layer with adaLN-zero: x + gate * f(modulate(norm(x))) for attention and MLP.

    The modulation Dense is zero-initialised, so all gates start at 0 and the block
    starts as the exact identity.
    """

    width: int
    heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cond: Array, rope: tuple[Array, Array]) -> Array:
        w = self.width
        mod = dense(6 * w, w, self.dtype, "adaln", "xavier", zero_kernel=True)(nn.silu(cond))[:, None]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        # Bidirectional (every token sees every token), QK-norm, 2D RoPE; no pre-norm: adaLN modulates.
        attention = Attention(w, w // self.heads, self.dtype, "rmsnorm", qk_norm=True, pre_norm=False, causal=False,
                              norm_eps=architecture.REVERSE_NORM_EPS, init="xavier",
                              rope_pairing=architecture.REVERSE_ROPE["pairing"], name="attention")
        x = x + gate_a * attention(modulate(rms_normalize(x), shift_a, scale_a), 1.0, rope)
        mlp = GatedMLP(w, architecture.swiglu_hidden(w, self.mlp_ratio), self.dtype, init="xavier", name="mlp")
        return x + gate_m * mlp(modulate(rms_normalize(x), shift_m, scale_m))


class StageHead(nn.Module):
    """phi_k: RMSNorm + Dense(width -> D), the Dense zero-initialised like DiT's final layer.

    Only the final (image) head is adaLN-modulated by c: the intermediate heads are
    alignment probes whose hidden input already carries the condition, and a
    width x 2*width modulation per head would add ~1.2M parameters each at B/2.
    """

    width: int
    token_dim: int
    modulated: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, cond: Array) -> Array:
        w = self.width
        if self.modulated:
            mod = dense(2 * w, w, self.dtype, "adaln", "xavier", zero_kernel=True)(nn.silu(cond))[:, None]
            shift, scale = jnp.split(mod, 2, axis=-1)
            h = modulate(rms_normalize(h), shift, scale)
        else:
            h = layer_norm(h, make_norm("rmsnorm", self.dtype, "norm", architecture.REVERSE_NORM_EPS))
        return dense(self.token_dim, w, self.dtype, "proj", "xavier", zero_kernel=True)(h).astype(jnp.float32)


class ReverseViT(nn.Module):
    """G: z tokens (N, T, D) in raster order -> B + 1 stage outputs (see module docstring).

    `num_classes` K > 0 gives a (K + 1)-row label table whose last row is the null
    token; labels < 0 (dropped) or y=None use it. `stage_bottleneck` routes the hidden
    stream through each stage's token-space output (re-embedded for the next stage),
    the architecture of the paper's "hidden distillation" ablation.
    """

    num_tokens: int
    token_dim: int
    num_forward_blocks: int
    depth: int
    width: int
    heads: int
    mlp_ratio: float = 4.0
    layers_per_stage: tuple[int, ...] | None = None
    num_classes: int = 0
    guidance_conditioning: bool = True
    guidance_embed_dim: int = 256
    stage_bottleneck: bool = False
    dtype: Any = jnp.float32

    @property
    def num_stages(self) -> int:
        return self.num_forward_blocks + 1

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        return architecture.stage_sizes(self.depth, self.num_forward_blocks, self.layers_per_stage)

    @property
    def grid(self) -> int:
        grid = math.isqrt(self.num_tokens)
        if grid * grid != self.num_tokens:
            raise ValueError(f"num_tokens={self.num_tokens} is not a square token grid")
        return grid

    def setup(self):
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
        self.embed = dense(self.width, self.token_dim, self.dtype, "embed", "xavier")
        self.class_embed = nn.Embed(self.num_classes + 1, self.width, param_dtype=jnp.float32,
                                    embedding_init=nn.initializers.normal(0.02), name="class_embed")
        if self.guidance_conditioning:
            self.guidance_mlp_in = nn.Dense(self.width, param_dtype=jnp.float32,
                                            kernel_init=nn.initializers.normal(0.02), name="guidance_mlp_in")
            self.guidance_mlp_out = nn.Dense(self.width, param_dtype=jnp.float32,
                                             kernel_init=nn.initializers.normal(0.02), name="guidance_mlp_out")
        total = sum(self.stage_sizes)
        self.blocks = [ReverseBlock(self.width, self.heads, self.mlp_ratio, self.dtype, name=f"blocks_{l}")
                       for l in range(total)]
        self.heads_ = [StageHead(self.width, self.token_dim, k == self.num_stages - 1, self.dtype, name=f"heads_{k}")
                       for k in range(self.num_stages)]
        if self.stage_bottleneck:
            self.reembed = [dense(self.width, self.token_dim, self.dtype, f"reembed_{k}", "xavier")
                            for k in range(self.num_stages - 1)]

    def label_index(self, y: Array | None, batch: int) -> Array:
        """Row of the label table: y in [0, K) itself; y < 0 (dropped), y = K, or None -> K (null token).

        Labels above K cannot be rejected inside jit; they also read the null row.
        """
        null = jnp.full((batch,), self.num_classes, jnp.int32)
        if y is None or not self.num_classes:
            return null
        y = jnp.asarray(y, jnp.int32)
        return jnp.where((y < 0) | (y >= self.num_classes), null, y)

    def condition(self, y: Array | None, w: Array | float | None, batch: int) -> Array:
        """c (N, width) = label embedding + MLP(sinusoid(w)); w=None means w=0. Float32."""
        c = self.class_embed(self.label_index(y, batch))
        if self.guidance_conditioning:
            w = jnp.broadcast_to(jnp.asarray(0.0 if w is None else w, jnp.float32), (batch,))
            e = guidance_frequencies(w, self.guidance_embed_dim)
            c = c + self.guidance_mlp_out(nn.silu(self.guidance_mlp_in(e)))
        return c

    def positions(self) -> Array:
        return jnp.asarray(sincos_2d_positions(self.grid, self.width)).astype(self.dtype)[None]

    def __call__(self, z: Array, y: Array | None = None, w: Array | float | None = None,
                 cfg_scale: Array | float | None = None) -> ReverseOutput:
        """One pass of G.

        `w`: the trained-in guidance scale (training-time CFG), scalar or (N,).
        `cfg_scale`: inference-time CFG (2 NFE). Conditional and unconditional (null
        label, w=0) branches run as one doubled batch; after every stage both hidden
        states are replaced by (1+s) h_c - s h_u and the stage output is mixed the same
        way from the two branches' heads. Returned arrays have the original batch size.
        """
        n, t, d = z.shape
        if t != self.num_tokens or d != self.token_dim:
            raise ValueError(f"expected tokens (N, {self.num_tokens}, {self.token_dim}), got {tuple(z.shape)}")
        cond = self.condition(y, w, n)
        guided = cfg_scale is not None
        if guided:
            s = jnp.broadcast_to(jnp.asarray(cfg_scale, jnp.float32), (n,))[:, None, None]
            cond = jnp.concatenate([cond, self.condition(None, 0.0, n)], axis=0)
            z = jnp.concatenate([z, z], axis=0)

            def mix(pair: Array) -> Array:
                c_part, u_part = pair[:n], pair[n:]
                return ((1 + s) * c_part - s * u_part).astype(pair.dtype)
        cond = cond.astype(self.dtype)
        rope = rope_tables(self.grid, self.width // self.heads, **architecture.REVERSE_ROPE)

        h = self.embed(z.astype(self.dtype)) + self.positions()
        outputs, hiddens, layer = [], [], 0
        for k, size in enumerate(self.stage_sizes):
            for _ in range(size):
                h = self.blocks[layer](h, cond, rope)
                layer += 1
            if guided:
                h = jnp.concatenate([mix(h)] * 2, axis=0)
            out = self.heads_[k](h, cond)
            if guided:
                out = mix(out)
            outputs.append(out)
            hiddens.append(h[:n])
            if self.stage_bottleneck and k < self.num_stages - 1:
                routed = jnp.concatenate([out] * 2, axis=0) if guided else out
                h = self.reembed[k](routed.astype(self.dtype)) + self.positions()
        return ReverseOutput(stage_outputs=tuple(outputs), image_tokens=outputs[-1], hiddens=tuple(hiddens))


PRESETS: dict[str, dict[str, Any]] = {
    # DiT-B/2-like: 12 layers, width 768, 12 heads (the paper's BiFlow-B/2 is ~133M).
    "B/2": dict(depth=12, width=768, heads=12, mlp_ratio=4.0),
    # DiT-L/2-like.
    "L/2": dict(depth=24, width=1024, heads=16, mlp_ratio=4.0),
    # DiT-XL/2-like: 28 layers, width 1152, 16 heads.
    "XL/2": dict(depth=28, width=1152, heads=16, mlp_ratio=4.0),
    # CPU tests and the 8x8 digits run.
    "tiny": dict(depth=4, width=64, heads=2, mlp_ratio=4.0),
}

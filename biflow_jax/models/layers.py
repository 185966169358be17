"""Layers shared by the forward flow (TARFlow, arXiv:2412.06329) and BiFlow's reverse model G
(arXiv:2512.10953): dense projections, norms, the GELU and gated MLPs, multi-head
self-attention and one 2D axial RoPE (RoFormer, arXiv:2104.09864).

The two models differ in conventions, not in maths, so each difference is an argument:
initialisation (`init="torch"`: torch.nn.Linear's, which the flow's paper numbers come
from; `"xavier"`: the ViT/DiT one G uses), the norm kind and epsilon, whether attention is
causal and pre-normed, and RoPE's base and channel pairing (`architecture.FLOW_ROPE`,
`architecture.REVERSE_ROPE`). Parameter names are the export layouts' (`interop/`).
Every Dense contracts on a 2D (N*T, C) view (`models/dense.py`): plain GEMMs on XLA:CPU.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax import architecture
from biflow_jax.models.attention import attention, decode_attention
from biflow_jax.models.dense import flat_dot_general

Array = jax.Array
# One attention layer's KV cache (past_k, past_v, chunk_k, chunk_v), each (N, heads, rows, head_dim).
LayerCache = tuple[Array, Array, Array, Array]
INITS = ("torch", "xavier")


def torch_uniform(fan_in: int):
    """PyTorch nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for kernel and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(features: int, fan_in: int, dtype: Any, name: str, init: str = "torch", zero_kernel: bool = False
          ) -> nn.Dense:
    """A Dense layer with float32 params, initialised like torch.nn.Linear (`init="torch"`) or
    xavier-uniform with zero bias (`"xavier"`); `zero_kernel` zeroes the kernel (adaLN-zero, heads)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    kernel = nn.initializers.xavier_uniform() if init == "xavier" else torch_uniform(fan_in)
    return nn.Dense(
        features, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.initializers.zeros if zero_kernel else kernel,
        bias_init=nn.initializers.zeros if init == "xavier" else torch_uniform(fan_in),
        dot_general=flat_dot_general, name=name,
    )


def accum_dtype(dtype: Any) -> Any:
    """float32 for float32/bfloat16 compute (norms, softmax and exp in float32); float64 stays."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def make_norm(kind: str, dtype: Any, name: str | None = None, eps: float = architecture.FLOW_NORM_EPS,
              use_scale: bool = True) -> nn.Module:
    """A LayerNorm or RMSNorm (arXiv:1910.07467); parameters float32, maths in `accum_dtype`."""
    if kind not in architecture.NORMS:
        raise ValueError(f"norm must be one of {architecture.NORMS}, got {kind!r}")
    norm = nn.RMSNorm if kind == "rmsnorm" else nn.LayerNorm
    return norm(epsilon=eps, dtype=accum_dtype(dtype), param_dtype=jnp.float32, use_scale=use_scale, name=name)


def layer_norm(x: Array, module: nn.Module) -> Array:
    """Apply a `make_norm` module in float32 (float64 for float64 models), back in x's dtype."""
    return module(x.astype(accum_dtype(x.dtype))).astype(x.dtype)


def gelu_exact(x: Array) -> Array:
    """Exact (erf) GELU, 0.5 x (1 + erf(x / sqrt 2)): torch.nn.GELU()'s formula. Same function as
    `jax.nn.gelu(x, approximate=False)` (which uses erfc), about 2.5x faster on CPU."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh(x: Array) -> Array:
    """GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): torch's
    F.gelu(approximate='tanh'), the gate of STARFlow's MLP."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


GATES = {"silu": jax.nn.silu, "gelu_tanh": gelu_tanh}


class MLP(nn.Module):
    """Pre-norm MLP with exact GELU; `main_0`/`main_2` mirror ml-tarflow's Sequential indices."""

    channels: int
    hidden: int
    dtype: Any = jnp.float32
    norm_kind: str = "layernorm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = layer_norm(x, make_norm(self.norm_kind, self.dtype, "norm"))
        h = gelu_exact(dense(self.hidden, self.channels, self.dtype, "main_0")(h))
        return dense(self.channels, self.hidden, self.dtype, "main_2")(h)


class GatedMLP(nn.Module):
    """down(gate(x W_gate) * (x W_up)) (Shazeer, arXiv:2002.05202), optionally pre-normed.

    `fused`: [gate | up] side by side in one `gate_up` Dense (our SwiGLU, the flow's and G's);
    else `gate_proj`, `up_proj`, `down_proj` as STARFlow's code names them (arXiv:2506.06276,
    with the tanh-GELU gate). `norm_kind=None`: the caller normalises (G's adaLN).
    """

    channels: int
    hidden: int
    dtype: Any = jnp.float32
    gate: str = "silu"
    fused: bool = True
    norm_kind: str | None = None
    init: str = "torch"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = x if self.norm_kind is None else layer_norm(x, make_norm(self.norm_kind, self.dtype, "norm"))
        c, hidden, dtype, init = self.channels, self.hidden, self.dtype, self.init
        if self.fused:
            gate, up = jnp.split(dense(2 * hidden, c, dtype, "gate_up", init)(h), 2, axis=-1)
            return dense(c, hidden, dtype, "down", init)(GATES[self.gate](gate) * up)
        gate = dense(hidden, c, dtype, "gate_proj", init)(h)
        up = dense(hidden, c, dtype, "up_proj", init)(h)
        return dense(c, hidden, dtype, "down_proj", init)(GATES[self.gate](gate) * up)


def rope_tables(grid: int, head_dim: int, base: float, pairing: str, flip: bool = False,
                dtype: Any = jnp.float32) -> tuple[Array, Array]:
    """cos and sin (T, head_dim) of 2D axial RoPE for a grid x grid raster (reversed with `flip`).

    Frequencies base^(-i / (head_dim / 4)); a token turns its row pairs by row * f_i and its
    column pairs by col * f_i. `pairing` "axis_halves": head = [r1, r2, c1, c2], pairs
    (r1, r2) and (c1, c2); "half_turn": pairs (j, j + head_dim/2), rows in the first quarter
    of each half. A flipped block's token j is raster token T-1-j and keeps its angles, so
    relative offsets stay true. Angles in float64, rounded once to `dtype`: every backend
    (and the PyTorch ports) gets the same table.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    if pairing not in architecture.ROPE_PAIRINGS:
        raise ValueError(f"RoPE pairing must be one of {architecture.ROPE_PAIRINGS}, got {pairing!r}")
    quarter = head_dim // 4
    freqs = 1.0 / base ** (np.arange(quarter) / quarter)
    t = np.arange(grid * grid)
    if flip:
        t = t[::-1]
    row, col = (t // grid)[:, None] * freqs, (t % grid)[:, None] * freqs
    parts = [row, row, col, col] if pairing == "axis_halves" else [row, col, row, col]
    angles = jnp.asarray(np.concatenate(parts, axis=-1).astype(jnp.dtype(dtype)))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array, pairing: str) -> Array:
    """Rotate (N, T, heads, head_dim) q or k by per-token (T, head_dim) tables; maths in cos's dtype."""
    quarter = x.shape[-1] // 4
    xf = x.astype(cos.dtype)
    q0, q1, q2, q3 = (xf[..., i * quarter:(i + 1) * quarter] for i in range(4))
    turned = [-q1, q0, -q3, q2] if pairing == "axis_halves" else [-q2, -q3, q0, q1]
    return (xf * cos[:, None] + jnp.concatenate(turned, axis=-1) * sin[:, None]).astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention: [pre-norm], qkv, [per-head q/k norm], [2D RoPE], softmax, proj.

    The flow's is causal and pre-normed and decodes one cached token at a time (`decode`);
    G's is bidirectional with QK-norm on an adaLN-modulated input. `rope`, where given, is the
    (cos, sin) pair of the tokens being processed (`rope_tables`), with `rope_pairing`.
    """

    channels: int
    head_dim: int = 64
    dtype: Any = jnp.float32
    norm_kind: str = "layernorm"
    qk_norm: bool = False
    pre_norm: bool = True
    causal: bool = True
    norm_eps: float = architecture.FLOW_NORM_EPS
    init: str = "torch"
    rope_pairing: str = architecture.FLOW_ROPE["pairing"]

    def setup(self):
        if self.channels % self.head_dim:
            raise ValueError(f"channels={self.channels} is not a multiple of head_dim={self.head_dim}")
        self.num_heads = self.channels // self.head_dim
        if self.pre_norm:
            self.norm = make_norm(self.norm_kind, self.dtype, eps=self.norm_eps)
        if self.qk_norm:  # one (head_dim,) norm shared by every head, for q and for k
            self.q_norm = make_norm(self.norm_kind, self.dtype, eps=self.norm_eps)
            self.k_norm = make_norm(self.norm_kind, self.dtype, eps=self.norm_eps)
        self.qkv = dense(3 * self.channels, self.channels, self.dtype, "qkv", self.init)
        self.proj = dense(self.channels, self.channels, self.dtype, "proj", self.init)

    def _qkv(self, x: Array, rope: tuple[Array, Array] | None = None) -> tuple[Array, Array, Array]:
        n, t, _ = x.shape
        qkv = self.qkv(layer_norm(x, self.norm) if self.pre_norm else x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        shape = (n, t, self.num_heads, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if self.qk_norm:
            q, k = layer_norm(q, self.q_norm), layer_norm(k, self.k_norm)
        if rope is not None:
            q, k = apply_rope(q, *rope, self.rope_pairing), apply_rope(k, *rope, self.rope_pairing)
        return q, k, v

    def __call__(self, x: Array, temp: Array | float = 1.0, rope: tuple[Array, Array] | None = None) -> Array:
        q, k, v = self._qkv(x, rope)
        out = attention(q, k, v, temp, accum_dtype(self.dtype), causal=self.causal)
        return self.proj(out.reshape(x.shape[0], x.shape[1], self.channels))

    def decode(self, x: Array, cache: LayerCache, index: Array, temp: Array | float = 1.0,
               rope: tuple[Array, Array] | None = None) -> tuple[Array, LayerCache]:
        """Attend from the single token `x` (N, 1, C) at position `index` to positions 0..index.

        `cache` = (past_k, past_v, chunk_k, chunk_v), each (N, heads, rows, head_dim): `past`
        holds positions 0..S-1 (all filled, read only), `chunk` positions S..S+C-1 of which
        those below `index` are filled; this token's k/v are written to chunk row index - S
        (with RoPE, the rotated k: `rope` is this token's (1, head_dim) cos/sin).
        Shapes are static, so the cache lives in lax loops; a sampler that splits its token
        loop into segments reads only the filled prefix, and since the loop-carried chunk is
        small, so is any copy XLA makes of it.
        """
        q, k, v = self._qkv(x, rope)
        past_k, past_v, chunk_k, chunk_v = cache
        n = x.shape[0]
        heads = (n, self.num_heads, self.head_dim)
        q, k, v = q.reshape(heads), k.reshape(heads), v.reshape(heads)
        row = index - past_k.shape[-2]
        out = decode_attention(q, (past_k, past_v), (chunk_k, chunk_v), row, (k, v), temp, accum_dtype(self.dtype))
        zero = jnp.zeros((), jnp.int32)
        chunk_k = jax.lax.dynamic_update_slice(chunk_k, k[:, :, None].astype(chunk_k.dtype), (zero, zero, row, zero))
        chunk_v = jax.lax.dynamic_update_slice(chunk_v, v[:, :, None].astype(chunk_v.dtype), (zero, zero, row, zero))
        out = self.proj(out.astype(self.dtype).reshape(n, 1, self.channels))
        return out, (past_k, past_v, chunk_k, chunk_v)

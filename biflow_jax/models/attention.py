"""Attention kernels: dense softmax attention (causal or not) and one cached decoding step.
The layer around them, shared by the flow and G, is `models/layers.Attention`.

CPU and accelerators take different paths, both the same maths:
- on GPU/TPU `jax.nn.dot_product_attention` (cuDNN flash attention for 16-bit dtypes on GPU);
- on CPU the (N, heads, T, head_dim) layout, where XLA's batched dots want the batch dimensions
  leading, the softmax normalised after the PV product (no (T, T) broadcast of the row sums), and
  causal queries in `CAUSAL_TILES` tiles that each read only the keys they can see, so the masked
  blocks above the diagonal are never computed.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from biflow_jax.platforms import target_platform

Array = jax.Array
CAUSAL_TILES = 4  # query tiles of the CPU causal attention (4 measured best at 256 tokens: train step -12%)


def _use_dot_product_attention() -> bool:
    """`jax.nn.dot_product_attention` on accelerators; on CPU our head-major XLA path is faster.
    Decided by the platform the program is built for (`platforms.target_platform`), not the host's."""
    return target_platform() != "cpu"


def _temp_scale(temp: Array | float, batch: int, acc: Any) -> Array | None:
    """1 / temp per sample, shaped (N, 1, 1, 1); None when temp is the constant 1."""
    if isinstance(temp, (int, float)) and temp == 1.0:
        return None
    inv = 1.0 / jnp.asarray(temp, acc)
    return jnp.broadcast_to(jnp.reshape(inv, (-1, 1, 1, 1)), (batch, 1, 1, 1))


def attention(q: Array, k: Array, v: Array, temp: Array | float = 1.0, acc: Any = jnp.float32,
              causal: bool = True) -> Array:
    """softmax(q k^T / (sqrt(d) temp) [+ causal mask]) v for (N, T, heads, head_dim) inputs, logits and
    softmax in `acc` (float32, or float64 for float64 models); returns (N, T, heads, head_dim)."""
    n, t, heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim)
    inv_temp = _temp_scale(temp, n, acc)
    if _use_dot_product_attention() and acc == jnp.float32:
        if inv_temp is not None:  # 1 / temp folds into q: (q / temp) k^T = q k^T / temp
            q = (q.astype(acc) * inv_temp.reshape(n, 1, 1, 1)).astype(q.dtype)
        impl = "cudnn" if (target_platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)) else None
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation=impl)
    # CPU: batch dims (N, heads) leading, so XLA's dots run as plain batched GEMMs. With the causal
    # mask the queries go in tiles, and tile i reads only the keys it can see (0 .. (i+1) rows - 1):
    # the fully masked blocks above the diagonal (3/8 of the logits with 4 tiles) are never formed.
    qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    tiles = CAUSAL_TILES if causal and t % CAUSAL_TILES == 0 and t >= 2 * CAUSAL_TILES else 1
    rows = t // tiles
    outs = []
    for i in range(tiles):
        keys = (i + 1) * rows if causal else t
        outs.append(_attention_tile(qh[:, :, i * rows:(i + 1) * rows], kh[:, :, :keys], vh[:, :, :keys], scale,
                                    inv_temp, acc, causal, i * rows))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


def _attention_tile(q: Array, k: Array, v: Array, scale: float, inv_temp: Array | None, acc: Any, causal: bool,
                    offset: int) -> Array:
    """Queries offset .. offset + Q - 1 against keys 0 .. K - 1, all (N, heads, *, head_dim)."""
    logits = jnp.einsum("nhqd,nhkd->nhqk", q, k, preferred_element_type=acc) * scale
    if inv_temp is not None:
        logits = logits * inv_temp
    if causal:
        visible = jnp.arange(k.shape[2])[None, :] <= offset + jnp.arange(q.shape[2])[:, None]
        logits = jnp.where(visible, logits, jnp.finfo(acc).min)
    # Softmax normalised after the PV product (as flash attention does): the division then runs
    # on (N, heads, T, head_dim) instead of (N, heads, T, T), and no (T, T) broadcast of the sum
    # is materialised. Each row keeps at least one unmasked logit, so the sum is >= 1.
    unnormalised = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    out = jnp.einsum("nhqk,nhkd->nhqd", unnormalised.astype(v.dtype), v, preferred_element_type=acc)
    return (out / total).astype(v.dtype)


def decode_attention(q: Array, past: tuple[Array, Array], chunk: tuple[Array, Array], filled: Array,
                     own: tuple[Array, Array], temp: Array | float, acc: Any) -> Array:
    """One query per sample, q (N, heads, head_dim), attending to: every row of `past` keys/values
    (N, heads, S, head_dim; S static, maybe 0), the first `filled` rows of `chunk` (N, heads, C,
    head_dim) and the token's own (k, v) (N, heads, head_dim), kept in full precision whatever
    the cache dtype. One softmax over all of them. Returns (N, heads, head_dim) in `acc`."""
    n, _, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim)
    inv_temp = _temp_scale(temp, n, acc)
    if inv_temp is not None:
        scale = scale * inv_temp.reshape(n, 1, 1)
    q = q.astype(acc)
    parts = []  # (logits, values) per source
    if past[0].shape[-2]:
        parts.append((jnp.einsum("nhd,nhkd->nhk", q.astype(past[0].dtype), past[0],
                                 preferred_element_type=acc) * scale, past[1]))
    if chunk[0].shape[-2]:
        logits = jnp.einsum("nhd,nhkd->nhk", q.astype(chunk[0].dtype), chunk[0], preferred_element_type=acc) * scale
        parts.append((jnp.where(jnp.arange(chunk[0].shape[-2]) < filled, logits, jnp.finfo(acc).min), chunk[1]))
    own_logit = jnp.sum(q * own[0].astype(acc), axis=-1, keepdims=True) * scale  # (N, heads, 1)
    top = own_logit
    for logits, _ in parts:
        top = jnp.maximum(top, jnp.max(logits, axis=-1, keepdims=True))
    top = jax.lax.stop_gradient(top)
    own_weight = jnp.exp(own_logit - top)
    total, out = own_weight, own_weight * own[1].astype(acc)
    for logits, values in parts:
        weights = jnp.exp(logits - top)
        total = total + jnp.sum(weights, axis=-1, keepdims=True)
        out = out + jnp.einsum("nhk,nhkd->nhd", weights.astype(values.dtype), values, preferred_element_type=acc)
    return out / total

"""TARFlow: the forward normalizing flow (data -> noise) of Zhai et al. (2024).

The whole flow in one file, with names that follow the paper and apple/ml-tarflow
so that exporting to that PyTorch reference is a rename and a transpose:
`blocks_{i}` <-> `blocks.{i}`, `attn_blocks_{l}` <-> `attn_blocks.{l}`,
`main_0`/`main_2` <-> `main.0`/`main.2`; Dense kernels are torch weights transposed.

Images are NHWC here (JAX convention); tokens keep torch `unfold`'s channel-major
order inside a patch, (c, i, j), so exported weights work on NCHW inputs there.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
KVCache = tuple[tuple[Array, Array], ...]  # one (keys, values) pair per layer


def patchify(x: Array, patch_size: int) -> Array:
    """(N, H, W, C) images -> (N, T, C*p*p) raster-ordered, channel-major tokens."""
    n, h, w, c = x.shape
    p = patch_size
    x = x.reshape(n, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # n, gh, gw, c, i, j
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Array, patch_size: int, height: int, width: int, channels: int) -> Array:
    """Inverse of `patchify`."""
    n = tokens.shape[0]
    p = patch_size
    x = tokens.reshape(n, height // p, width // p, channels, p, p)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # n, gh, i, gw, j, c
    return x.reshape(n, height, width, channels)


def torch_uniform(fan_in: int):
    """PyTorch nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for kernel and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear(features: int, fan_in: int, dtype: Any, name: str, zero_kernel: bool = False) -> nn.Dense:
    """A Dense layer initialised like torch.nn.Linear (the reference the paper's numbers come from)."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.zeros if zero_kernel else torch_uniform(fan_in),
        bias_init=torch_uniform(fan_in),
        name=name,
    )


def accum_dtype(dtype: Any) -> Any:
    """float32 for float32/bfloat16 compute (PAPERS.md: LayerNorm and exp in float32); float64 stays."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def layer_norm(x: Array, module: nn.LayerNorm) -> Array:
    """LayerNorm computed in float32 (float64 for float64 models) whatever the compute dtype."""
    return module(x.astype(accum_dtype(x.dtype))).astype(x.dtype)


def soft_clip(a: Array, clip: float) -> Array:
    """Norm control: bound the log-scale smoothly to (-clip, clip); clip <= 0 disables it."""
    if clip <= 0:
        return a
    return clip * jnp.tanh(a / clip)


class Attention(nn.Module):
    """Pre-LN multi-head self-attention with a causal mask, or one cached decoding step."""

    channels: int
    head_dim: int = 64
    dtype: Any = jnp.float32

    def setup(self):
        if self.channels % self.head_dim:
            raise ValueError(f"channels={self.channels} is not a multiple of head_dim={self.head_dim}")
        self.num_heads = self.channels // self.head_dim
        self.norm = nn.LayerNorm(epsilon=1e-5, dtype=accum_dtype(self.dtype), param_dtype=jnp.float32)
        self.qkv = linear(3 * self.channels, self.channels, self.dtype, "qkv")
        self.proj = linear(self.channels, self.channels, self.dtype, "proj")

    def _qkv(self, x: Array) -> tuple[Array, Array, Array]:
        n, t, _ = x.shape
        qkv = self.qkv(layer_norm(x, self.norm))
        q, k, v = jnp.split(qkv, 3, axis=-1)
        shape = (n, t, self.num_heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _attend(self, q: Array, k: Array, v: Array, mask: Array, temp: Array | float) -> Array:
        scale = 1.0 / math.sqrt(self.head_dim)
        acc = accum_dtype(self.dtype)
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(acc) * scale
        logits = logits / jnp.reshape(jnp.asarray(temp, acc), (-1, 1, 1, 1))
        logits = jnp.where(mask, logits, jnp.finfo(acc).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", weights, v)
        return self.proj(out.reshape(out.shape[0], out.shape[1], self.channels))

    def __call__(self, x: Array, temp: Array | float = 1.0) -> Array:
        q, k, v = self._qkv(x)
        t = x.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        return self._attend(q, k, v, causal, temp)

    def decode(self, x: Array, cache: tuple[Array, Array], index: Array, temp: Array | float = 1.0):
        """Attend from the single token `x` (N, 1, C) at position `index` to keys 0..index.

        The cache (N, T, heads, head_dim) is preallocated, so shapes stay static in lax loops.
        """
        q, k, v = self._qkv(x)
        keys = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, axis=1)
        visible = (jnp.arange(keys.shape[1]) <= index)[None, None, None, :]
        return self._attend(q, keys, values, visible, temp), (keys, values)


class MLP(nn.Module):
    """Pre-LN MLP with exact GELU; `main_0`/`main_2` mirror the reference's Sequential indices."""

    channels: int
    expansion: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = layer_norm(x, nn.LayerNorm(epsilon=1e-5, dtype=accum_dtype(self.dtype), param_dtype=jnp.float32,
                                       name="norm"))
        h = linear(self.channels * self.expansion, self.channels, self.dtype, "main_0")(h)
        h = nn.gelu(h, approximate=False)
        return linear(self.channels, self.channels * self.expansion, self.dtype, "main_2")(h)


class AttentionBlock(nn.Module):
    """One transformer layer: x + attention(x), then x + mlp(x)."""

    channels: int
    head_dim: int = 64
    expansion: int = 4
    dtype: Any = jnp.float32

    def setup(self):
        self.attention = Attention(self.channels, self.head_dim, self.dtype)
        self.mlp = MLP(self.channels, self.expansion, self.dtype)

    def __call__(self, x: Array, temp: Array | float = 1.0) -> Array:
        x = x + self.attention(x, temp)
        return x + self.mlp(x)

    def decode(self, x: Array, cache: tuple[Array, Array], index: Array, temp: Array | float = 1.0):
        h, cache = self.attention.decode(x, cache, index, temp)
        x = x + h
        return x + self.mlp(x), cache


class MetaBlock(nn.Module):
    """One autoregressive affine flow step over a (possibly reversed) token order.

    All token arrays passed to the public methods are in the *model's* raster order;
    the permutation (identity or flip) is applied and undone inside.
    """

    token_dim: int
    channels: int
    num_tokens: int
    num_layers: int
    flip: bool
    num_classes: int = 0
    head_dim: int = 64
    expansion: int = 4
    clip: float = 0.0
    dtype: Any = jnp.float32

    def setup(self):
        self.proj_in = linear(self.channels, self.token_dim, self.dtype, "proj_in")
        self.pos_embed = self.param(
            "pos_embed", nn.initializers.normal(0.01), (self.num_tokens, self.channels), jnp.float32
        )
        if self.num_classes:
            self.class_embed = self.param(
                "class_embed", nn.initializers.normal(0.01), (self.num_classes, 1, self.channels), jnp.float32
            )
        self.attn_blocks = [
            AttentionBlock(self.channels, self.head_dim, self.expansion, self.dtype, name=f"attn_blocks_{l}")
            for l in range(self.num_layers)
        ]
        self.proj_out = linear(2 * self.token_dim, self.channels, self.dtype, "proj_out", zero_kernel=True)

    def permute(self, x: Array) -> Array:
        """The block's token order; a flip is its own inverse."""
        return x[:, ::-1] if self.flip else x

    def condition(self, y: Array | None, class_mix: Array | None = None) -> Array:
        """Class embedding (N or 1, 1, C): a dropped label (y < 0) or no label uses the class mean.

        `class_mix` (N, K) replaces the one-hot lookup by a soft mixture of the table,
        which training-free classification differentiates.
        """
        if not self.num_classes:
            return jnp.zeros((1, 1, self.channels), jnp.float32)
        table = self.class_embed
        if class_mix is not None:
            return jnp.einsum("nk,kc->nc", class_mix, table[:, 0])[:, None]
        mean = table.mean(axis=0, keepdims=True)
        if y is None:
            return mean
        chosen = table[jnp.clip(y, 0, self.num_classes - 1)]
        return jnp.where((y < 0)[:, None, None], mean, chosen)

    def transform(self, x_perm: Array, y: Array | None = None, temp: Array | float = 1.0,
                  class_mix: Array | None = None) -> tuple[Array, Array, tuple[Array, ...]]:
        """(a, b) for every token of `x_perm` (block order), shifted so token t sees only x[<t].

        Returns the clipped log-scale a, the shift b (both float32) and the hidden state
        after each transformer layer (block order, before the shift).
        """
        pos = self.pos_embed[::-1] if self.flip else self.pos_embed
        h = self.proj_in(x_perm.astype(self.dtype)) + pos.astype(self.dtype)
        h = h + self.condition(y, class_mix).astype(self.dtype)
        hiddens = []
        for layer in self.attn_blocks:
            h = layer(h, temp)
            hiddens.append(h)
        out = self.proj_out(h).astype(accum_dtype(self.dtype))
        out = jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1)
        a, b = jnp.split(out, 2, axis=-1)
        return soft_clip(a, self.clip), b, tuple(hiddens)

    def __call__(self, x: Array, y: Array | None = None,
                 class_mix: Array | None = None) -> tuple[Array, Array, tuple[Array, ...]]:
        """x (N, T, D) -> z = (x - b) * exp(-a), per-sample log|det| / dims, layer hiddens."""
        x_perm = self.permute(x).astype(accum_dtype(self.dtype))
        a, b, hiddens = self.transform(x_perm, y, 1.0, class_mix)
        z = (x_perm - b) * jnp.exp(-a)
        return self.permute(z), -a.mean(axis=(1, 2)), hiddens

    def init_cache(self, batch: int, dtype: Any = None) -> KVCache:
        shape = (batch, self.num_tokens, self.channels // self.head_dim, self.head_dim)
        dtype = dtype or self.dtype
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.num_layers))

    def decode_step(self, x_t: Array, index: Array, cache: KVCache, y: Array | None = None,
                    temp: Array | float = 1.0) -> tuple[Array, Array, KVCache]:
        """Feed token `index` (N, D) of the block-ordered sequence; return the raw (a, b)
        that token `index + 1` needs (clipped, float32) and the updated cache."""
        pos = self.pos_embed[::-1] if self.flip else self.pos_embed
        p = jax.lax.dynamic_slice_in_dim(pos, index, 1, axis=0)
        h = self.proj_in(x_t[:, None].astype(self.dtype)) + p.astype(self.dtype)
        h = h + self.condition(y).astype(self.dtype)
        new_cache = []
        for layer, layer_cache in zip(self.attn_blocks, cache):
            h, layer_cache = layer.decode(h, layer_cache, index, temp)
            new_cache.append(layer_cache)
        out = self.proj_out(h)[:, 0].astype(accum_dtype(self.dtype))
        a, b = jnp.split(out, 2, axis=-1)
        return soft_clip(a, self.clip), b, tuple(new_cache)


@struct.dataclass
class FlowOutput:
    """What the forward pass returns.

    z: (N, T, D) noise tokens. logdets: (N, B) per-block log|det| divided by the number
    of dimensions. trajectory: B+1 token arrays x^0 (input) ... x^B (= z), raster order.
    hiddens: per block, the hidden state after each layer (N, T, C), block token order.
    """

    z: Array
    logdets: Array
    trajectory: tuple[Array, ...]
    hiddens: tuple[tuple[Array, ...], ...]


class TARFlow(nn.Module):
    """The forward flow F: images (N, H, W, C) in [-1, 1] -> Gaussian noise tokens."""

    img_size: int
    in_channels: int
    patch_size: int
    channels: int
    num_blocks: int
    layers_per_block: int
    num_classes: int = 0
    head_dim: int = 64
    expansion: int = 4
    clip: float = 0.0
    dtype: Any = jnp.float32

    @property
    def num_tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    def setup(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"image size {self.img_size} is not divisible by patch size {self.patch_size}")
        self.blocks = [
            MetaBlock(
                token_dim=self.token_dim, channels=self.channels, num_tokens=self.num_tokens,
                num_layers=self.layers_per_block, flip=bool(i % 2), num_classes=self.num_classes,
                head_dim=self.head_dim, expansion=self.expansion, clip=self.clip, dtype=self.dtype,
                name=f"blocks_{i}",
            )
            for i in range(self.num_blocks)
        ]

    def check_images(self, x: Array) -> None:
        expected = (self.img_size, self.img_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (N, {expected[0]}, {expected[1]}, {expected[2]}) (NHWC), "
                             f"got {tuple(x.shape)}")

    def __call__(self, x: Array, y: Array | None = None, class_mix: Array | None = None) -> FlowOutput:
        """`class_mix` (N, K), if given, replaces the label by a soft mixture of class embeddings."""
        self.check_images(x)
        tokens = patchify(x.astype(accum_dtype(self.dtype)), self.patch_size)
        trajectory, logdets, hiddens = [tokens], [], []
        for block in self.blocks:
            tokens, logdet, h = block(tokens, y, class_mix)
            trajectory.append(tokens)
            logdets.append(logdet)
            hiddens.append(h)
        return FlowOutput(z=tokens, logdets=jnp.stack(logdets, axis=1),
                          trajectory=tuple(trajectory), hiddens=tuple(hiddens))

    def to_images(self, tokens: Array) -> Array:
        return unpatchify(tokens, self.patch_size, self.img_size, self.img_size, self.in_channels)

    # Methods used through `apply(..., method=...)` by sampling, R-REPA and BiFlow.
    def block_forward(self, index: int, x: Array, y: Array | None = None):
        return self.blocks[index](x, y)

    def block_transform(self, index: int, x_perm: Array, y: Array | None = None, temp: Array | float = 1.0,
                        class_mix: Array | None = None):
        return self.blocks[index].transform(x_perm, y, temp, class_mix)

    def block_decode_step(self, index: int, x_t: Array, t: Array, cache: KVCache, y: Array | None = None,
                          temp: Array | float = 1.0):
        return self.blocks[index].decode_step(x_t, t, cache, y, temp)

    def init_caches(self, batch: int) -> tuple[KVCache, ...]:
        return tuple(block.init_cache(batch) for block in self.blocks)


def build_flow(cfg: Any) -> TARFlow:
    """The flow described by a `config.model` ConfigDict."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
    if cfg.dtype not in dtypes:
        raise ValueError(f"model.dtype must be one of {sorted(dtypes)}, got {cfg.dtype!r}")
    return TARFlow(
        img_size=cfg.img_size, in_channels=cfg.in_channels, patch_size=cfg.patch_size,
        channels=cfg.channels, num_blocks=cfg.num_blocks, layers_per_block=cfg.layers_per_block,
        num_classes=cfg.num_classes, head_dim=cfg.head_dim, expansion=cfg.expansion,
        clip=cfg.clip, dtype=dtypes[cfg.dtype],
    )


def count_params(params: Any) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))

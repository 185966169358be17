"""TARFlow: the forward normalizing flow (data -> noise) of Zhai et al. (arXiv:2412.06329).

The flow's blocks and builder; the layers it shares with G are `models/layers.py`, its
widths and options `biflow_jax.architecture`. Names that follow the paper and apple/ml-tarflow
so that exporting to that PyTorch reference is a rename and a transpose:
`blocks_{i}` <-> `blocks.{i}`, `attn_blocks_{l}` <-> `attn_blocks.{l}`,
`main_0`/`main_2` <-> `main.0`/`main.2`; Dense kernels are torch weights transposed.

Images are NHWC here (JAX convention); tokens keep torch `unfold`'s channel-major
order inside a patch, (c, i, j), so exported weights work on NCHW inputs there.

Performance notes (profiled on CPU, kept accelerator-ready):
- the attention kernels (CPU and accelerator paths) live in `models/attention.py`, the
  2D-view Dense and exact-GELU formula in `models/layers.py`;
- the KV cache is (N, heads, rows, head_dim), split into a read-only `past` and the
  `chunk` a decode loop fills (`Attention.decode`, `advance_cache`): a sampler that splits
  its token loop into segments attends only to the filled prefix, and XLA's per-step copy
  of the loop-carried cache (CPU copy insertion) shrinks to the chunk;
- `scan_layers` puts each block's layers under `nn.scan` (params stacked on a leading
  axis: convert with `models/param_trees.py`), and `remat`
  ("none" | "full" | "dots") rematerialises each layer in the backward pass.

Improved-TARFlow options (STARFlow arXiv:2506.06276, R-REPA arXiv:2511.22345), each off by
default so the default flow stays exactly ml-tarflow's: `rope` (2D axial rotary positions,
RoFormer arXiv:2104.09864, replacing the learned `pos_embed`), `norm="rmsnorm"` (arXiv:1910.07467),
`qk_norm` (per-head norm of q and k), `mlp="swiglu"` (arXiv:2002.05202) and `block_layers`
(a per-block layer count: STARFlow's deep-shallow flow). Only `biflow_jax.torch` reads a flow
exported with any of them; ml-tarflow cannot.

Where STARFlow's code differs from ours, its choice is an option beside ours (docs/tarflow.md):
`clip_shift` soft-clips the shift b as well as the log-scale a (STARFlow clips the whole
output of proj_out; ours clips a only), and `mlp="geglu_starflow"` is STARFlow's gated MLP
(tanh-GELU gate, hidden C * expansion, separate gate/up/down) where `mlp="swiglu"` is ours
(SiLU gate, hidden ceil(8C/3) rounded to 8, one gate_up matmul).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from biflow_jax import architecture
from biflow_jax.models.layers import MLP, Attention, GatedMLP, LayerCache, accum_dtype, dense, rope_tables

Array = jax.Array
# Per layer a `LayerCache` (past_k, past_v, chunk_k, chunk_v), each (N, heads, rows, head_dim): see
# layers.Attention.decode. With scan_layers a single such tuple, stacked over the layers (L, N, heads, rows, head_dim).
KVCache = tuple[LayerCache, ...]


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


def soft_clip(a: Array, clip: float) -> Array:
    """Norm control: bound the log-scale smoothly to (-clip, clip); clip <= 0 disables it."""
    if clip <= 0:
        return a
    return clip * jnp.tanh(a / clip)


def flow_mlp(kind: str, channels: int, expansion: int, dtype: Any, norm_kind: str) -> nn.Module:
    """The flow's pre-norm MLP of `model.mlp` kind: exact-GELU (ml-tarflow), our SwiGLU (SiLU gate,
    one `gate_up` matmul) or STARFlow's gated MLP (arXiv:2506.06276; tanh-GELU gate, separate layers)."""
    hidden = architecture.mlp_hidden(kind, channels, expansion)
    if kind == "gelu":
        return MLP(channels, hidden, dtype, norm_kind)
    swiglu = kind == "swiglu"
    return GatedMLP(channels, hidden, dtype, gate="silu" if swiglu else "gelu_tanh", fused=swiglu, norm_kind=norm_kind)


class AttentionBlock(nn.Module):
    """One transformer layer: x + attention(x), then x + mlp(x)."""

    channels: int
    head_dim: int = 64
    expansion: int = 4
    dtype: Any = jnp.float32
    norm_kind: str = "layernorm"
    qk_norm: bool = False
    mlp_kind: str = "gelu"

    def setup(self):
        self.attention = Attention(self.channels, self.head_dim, self.dtype, self.norm_kind, self.qk_norm)
        self.mlp = flow_mlp(self.mlp_kind, self.channels, self.expansion, self.dtype, self.norm_kind)

    def __call__(self, x: Array, temp: Array | float = 1.0, rope: tuple[Array, Array] | None = None) -> Array:
        x = x + self.attention(x, temp, rope)
        return x + self.mlp(x)

    def decode(self, x: Array, cache: LayerCache, index: Array, temp: Array | float = 1.0,
               rope: tuple[Array, Array] | None = None):
        h, cache = self.attention.decode(x, cache, index, temp, rope)
        x = x + h
        return x + self.mlp(x), cache


def block_order(tokens: Array, flip: bool) -> Array:
    """Raster <-> a block's token order (reversed where the block flips; a flip is its own inverse).
    Which blocks flip: `architecture.block_flipped`."""
    return tokens[:, ::-1] if flip else tokens


def remat_policy(name: str):
    """`model.remat` -> (rematerialise?, jax.checkpoint policy)."""
    if name not in architecture.REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {architecture.REMAT_POLICIES}, got {name!r}")
    policies = {"none": None, "full": None, "dots": jax.checkpoint_policies.checkpoint_dots,
                "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}
    return name != "none", policies[name]


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
    scan_layers: bool = False
    remat: str = "none"
    rope: bool = False
    norm_kind: str = "layernorm"
    qk_norm: bool = False
    mlp_kind: str = "gelu"
    clip_shift: bool = False  # soft-clip b as well as a (STARFlow)

    def setup(self):
        self.proj_in = dense(self.channels, self.token_dim, self.dtype, "proj_in")
        if not self.rope:  # RoPE carries the positions instead of a learned table
            self.pos_embed = self.param(
                "pos_embed", nn.initializers.normal(0.01), (self.num_tokens, self.channels), jnp.float32
            )
        if self.num_classes:
            self.class_embed = self.param(
                "class_embed", nn.initializers.normal(0.01), (self.num_classes, 1, self.channels), jnp.float32
            )
        rematerialise, policy = remat_policy(self.remat)
        layer_cls = (nn.remat(AttentionBlock, policy=policy, prevent_cse=not self.scan_layers)
                     if rematerialise else AttentionBlock)
        layer_args = (self.channels, self.head_dim, self.expansion, self.dtype, self.norm_kind, self.qk_norm,
                      self.mlp_kind)
        if self.scan_layers:  # one module; nn.scan stacks its params over a leading layer axis
            self.attn_blocks = layer_cls(*layer_args, name="attn_blocks")
        else:
            self.attn_blocks = [layer_cls(*layer_args, name=f"attn_blocks_{l}") for l in range(self.num_layers)]
        self.proj_out = dense(2 * self.token_dim, self.channels, self.dtype, "proj_out", zero_kernel=True)

    def rope_tables(self, index: Array | None = None) -> tuple[Array, Array] | None:
        """This block's RoPE (cos, sin), (T, head_dim) in block order, or the (1, head_dim) row of
        block-order position `index`; None without RoPE."""
        if not self.rope:
            return None
        cos, sin = rope_tables(math.isqrt(self.num_tokens), self.head_dim, **architecture.FLOW_ROPE, flip=self.flip,
                               dtype=accum_dtype(self.dtype))
        if index is None:
            return cos, sin
        return jax.lax.dynamic_slice_in_dim(cos, index, 1), jax.lax.dynamic_slice_in_dim(sin, index, 1)

    def embed(self, x_perm: Array, index: Array | None = None) -> Array:
        """proj_in of block-ordered tokens plus the learned position (all T, or the one at `index`)."""
        h = self.proj_in(x_perm.astype(self.dtype))
        if self.rope:
            return h
        pos = self.pos_embed[::-1] if self.flip else self.pos_embed
        if index is not None:
            pos = jax.lax.dynamic_slice_in_dim(pos, index, 1, axis=0)
        return h + pos.astype(self.dtype)

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
        h = self.embed(x_perm) + self.condition(y, class_mix).astype(self.dtype)
        rope = self.rope_tables()
        if self.scan_layers:
            def body(layer, carry, _):
                carry = layer(carry, temp, rope)
                return carry, carry

            scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.num_layers)
            h, stacked = scan(self.attn_blocks, h, None)
            hiddens = [stacked[l] for l in range(self.num_layers)]
        else:
            hiddens = []
            for layer in self.attn_blocks:
                h = layer(h, temp, rope)
                hiddens.append(h)
        out = self.proj_out(h).astype(accum_dtype(self.dtype))
        out = jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1)
        a, b = jnp.split(out, 2, axis=-1)
        return (*self.clip_ab(a, b), tuple(hiddens))

    def clip_ab(self, a: Array, b: Array) -> tuple[Array, Array]:
        """The soft clip of proj_out's output: the log-scale a always, the shift b with `clip_shift`
        (STARFlow arXiv:2506.06276 clips both; without it b is left alone)."""
        return soft_clip(a, self.clip), soft_clip(b, self.clip) if self.clip_shift else b

    def __call__(self, x: Array, y: Array | None = None,
                 class_mix: Array | None = None) -> tuple[Array, Array, tuple[Array, ...], tuple[Array, Array]]:
        """x (N, T, D) -> z = (x - b) * exp(-a), per-sample log|det| / dims, layer hiddens, and (a, b)
        (block order)."""
        x_perm = block_order(x, self.flip).astype(accum_dtype(self.dtype))
        a, b, hiddens = self.transform(x_perm, y, 1.0, class_mix)
        z = (x_perm - b) * jnp.exp(-a)
        return block_order(z, self.flip), -a.mean(axis=(1, 2)), hiddens, (a, b)

    def init_cache(self, batch: int, dtype: Any = None, rows: int | None = None) -> KVCache:
        """An empty cache: no past, a zero chunk of `rows` positions (default all T) per layer."""
        rows = self.num_tokens if rows is None else rows
        heads, head_dim = self.channels // self.head_dim, self.head_dim
        dtype = dtype or self.dtype
        lead = (self.num_layers,) if self.scan_layers else ()
        empty = jnp.zeros(lead + (batch, heads, 0, head_dim), dtype)
        chunk = jnp.zeros(lead + (batch, heads, rows, head_dim), dtype)
        layer = (empty, empty, chunk, chunk)
        return (layer,) if self.scan_layers else tuple(layer for _ in range(self.num_layers))

    def decode_step(self, x_t: Array, index: Array, cache: KVCache, y: Array | None = None,
                    temp: Array | float = 1.0) -> tuple[Array, Array, KVCache]:
        """Feed token `index` (N, D) of the block-ordered sequence; return the raw (a, b)
        that token `index + 1` needs (clipped, float32) and the updated cache.

        `index` must lie in the cache's chunk (past rows <= index < past + chunk rows)."""
        h = self.embed(x_t[:, None], index) + self.condition(y).astype(self.dtype)
        rope = self.rope_tables(index)
        if self.scan_layers:
            def body(layer, carry, layer_cache):
                return layer.decode(carry, layer_cache, index, temp, rope)

            scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": False}, length=self.num_layers)
            h, stacked = scan(self.attn_blocks, h, cache[0])
            new_cache = [stacked]
        else:
            new_cache = []
            for layer, layer_cache in zip(self.attn_blocks, cache):
                h, layer_cache = layer.decode(h, layer_cache, index, temp, rope)
                new_cache.append(layer_cache)
        out = self.proj_out(h)[:, 0].astype(accum_dtype(self.dtype))
        a, b = jnp.split(out, 2, axis=-1)
        return (*self.clip_ab(a, b), tuple(new_cache))


@struct.dataclass
class FlowOutput:
    """What the forward pass returns.

    z: (N, T, D) noise tokens. logdets: (N, B) per-block log|det| divided by the number
    of dimensions. trajectory: B+1 token arrays x^0 (input) ... x^B (= z), raster order.
    hiddens: per block, the hidden state after each layer (N, T, C), block token order.
    affine: per block its (a, b) (N, T, D), block token order, when asked for (`with_affine`;
    R-REPA's teacher-forced inverse reuses them), else ().
    """

    z: Array
    logdets: Array
    trajectory: tuple[Array, ...]
    hiddens: tuple[tuple[Array, ...], ...]
    affine: tuple[tuple[Array, Array], ...] = ()


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
    scan_layers: bool = False  # each block's layers under nn.scan (stacked params: see stack_layer_params)
    remat: str = "none"  # "none" | "full" | "dots" | "dots_no_batch": per-layer rematerialisation
    rope: bool = False  # 2D axial RoPE on q, k (no learned pos_embed)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm": every pre-norm (and the q/k norms)
    qk_norm: bool = False  # per-head norm of q and k before RoPE
    mlp: str = "gelu"  # "gelu" | "swiglu" (ours) | "geglu_starflow" (STARFlow's gated MLP)
    block_layers: tuple[int, ...] = ()  # per-block layer counts, forward order; () = layers_per_block each
    clip_shift: bool = False  # the soft clip acts on the shift too (STARFlow), not only the log-scale

    @property
    def layer_counts(self) -> tuple[int, ...]:
        """Layers of each block, in forward (data -> noise) order."""
        return architecture.layer_counts(self.num_blocks, self.layers_per_block, self.block_layers)

    @property
    def num_tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    def setup(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"image size {self.img_size} is not divisible by patch size {self.patch_size}")
        architecture.check_flow_options(self.num_blocks, self.head_dim, self.rope, self.norm, self.mlp,
                                        self.block_layers, self.remat)
        self.blocks = [
            MetaBlock(
                token_dim=self.token_dim, channels=self.channels, num_tokens=self.num_tokens,
                num_layers=layers, flip=architecture.block_flipped(i), num_classes=self.num_classes,
                head_dim=self.head_dim, expansion=self.expansion, clip=self.clip, dtype=self.dtype,
                scan_layers=self.scan_layers, remat=self.remat, rope=self.rope, norm_kind=self.norm,
                qk_norm=self.qk_norm, mlp_kind=self.mlp, clip_shift=self.clip_shift, name=f"blocks_{i}",
            )
            for i, layers in enumerate(self.layer_counts)
        ]

    def check_images(self, x: Array) -> None:
        expected = (self.img_size, self.img_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (N, {expected[0]}, {expected[1]}, {expected[2]}) (NHWC), "
                             f"got {tuple(x.shape)}")

    def __call__(self, x: Array, y: Array | None = None, class_mix: Array | None = None,
                 with_affine: bool = False) -> FlowOutput:
        """`class_mix` (N, K), if given, replaces the label by a soft mixture of class embeddings;
        `with_affine` also returns each block's (a, b)."""
        self.check_images(x)
        tokens = patchify(x.astype(accum_dtype(self.dtype)), self.patch_size)
        trajectory, logdets, hiddens, affine = [tokens], [], [], []
        for block in self.blocks:
            tokens, logdet, h, ab = block(tokens, y, class_mix)
            trajectory.append(tokens)
            logdets.append(logdet)
            hiddens.append(h)
            affine.append(ab)
        return FlowOutput(z=tokens, logdets=jnp.stack(logdets, axis=1), trajectory=tuple(trajectory),
                          hiddens=tuple(hiddens), affine=tuple(affine) if with_affine else ())

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

    def init_caches(self, batch: int, dtype: Any = None, rows: int | None = None) -> tuple[KVCache, ...]:
        return tuple(block.init_cache(batch, dtype, rows) for block in self.blocks)


def advance_cache(cache: KVCache, rows: int) -> KVCache:
    """Start the next decode segment: the filled chunk joins the past, and a zero chunk of
    `rows` positions follows it (static shapes: a segment's loop reads a fixed-length prefix)."""
    def advance(layer: LayerCache) -> LayerCache:
        past_k, past_v, chunk_k, chunk_v = layer
        past_k = jnp.concatenate([past_k, chunk_k], axis=-2)
        past_v = jnp.concatenate([past_v, chunk_v], axis=-2)
        shape = chunk_k.shape[:-2] + (rows, chunk_k.shape[-1])
        return past_k, past_v, jnp.zeros(shape, chunk_k.dtype), jnp.zeros(shape, chunk_v.dtype)

    return tuple(advance(layer) for layer in cache)


def build_flow(cfg: Any) -> TARFlow:
    """The flow described by a `config.model` ConfigDict (or a plain dict with the same keys).

    `scan_layers`, `remat` and the improved-flow options (`rope`, `norm`, `qk_norm`, `mlp`,
    `block_layers`, `clip_shift`) are optional keys whose defaults build the ml-tarflow model, so older
    configs build the same model as before.
    """
    dtype = getattr(jnp, architecture.check_dtype(cfg["dtype"], "model.dtype"))
    options = architecture.flow_options(cfg)
    return TARFlow(
        img_size=cfg["img_size"], in_channels=cfg["in_channels"], patch_size=cfg["patch_size"],
        channels=cfg["channels"], num_blocks=cfg["num_blocks"], layers_per_block=cfg["layers_per_block"],
        num_classes=cfg["num_classes"], head_dim=cfg["head_dim"], expansion=cfg["expansion"],
        clip=cfg["clip"], dtype=dtype, **options,
    )

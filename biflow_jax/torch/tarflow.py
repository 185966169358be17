"""PyTorch port of our forward TARFlow, with apple/ml-tarflow's module and parameter names.

Why a port: exported weights (`biflow_jax.export`) must run where people use PyTorch, and
the same state_dict layout lets ml-tarflow checkpoints come the other way. The module tree
(`blocks.{i}.attn_blocks.{l}.attention.qkv`, ...) reproduces ml-tarflow's names exactly;
the maths reproduces *our* Flax flow (`biflow_jax.models.tarflow`), which adds two options
ml-tarflow lacks: the soft clip c*tanh(a/c) on the log-scale, and configurable head_dim /
MLP expansion. With clip=0 and the defaults the two agree.

It also ports the improved-TARFlow options of our flow, all off by default (then the module
tree and state_dict are exactly ml-tarflow's; ml-tarflow has none of these options, so only
this port loads a flow that uses one):
- `rope`: 2D axial rotary position embedding on q and k (RoFormer, arXiv:2104.09864)
  instead of the learned `pos_embed`; a head vector's first half turns by the token's row,
  its second half by its column;
- `norm="rmsnorm"`: RMSNorm pre-norms (arXiv:1910.07467), weight only;
- `qk_norm`: q and k normalised per head over head_dim (`attention.q_norm` / `k_norm`);
- `mlp="swiglu"`: the SwiGLU MLP (arXiv:2002.05202), `mlp.gate_up` and `mlp.down`;
- `mlp="geglu_starflow"`: STARFlow's gated MLP (arXiv:2506.06276; tanh-GELU gate, hidden
  C * expansion), `mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`;
- `clip_shift`: the soft clip acts on the shift b as well as the log-scale a (STARFlow);
- `block_layers`: a layer count per block, e.g. STARFlow's deep-shallow flow (arXiv:2506.06276).

Images are NCHW in [-1, 1]; tokens come from `F.unfold`, so inside a patch the order is
channel-major (c, i, j), the same as our JAX `patchify` on NHWC images.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from biflow_jax import architecture


def soft_clip(a: torch.Tensor, clip: float) -> torch.Tensor:
    """Bound the log-scale smoothly to (-clip, clip); clip <= 0 leaves it alone."""
    if clip <= 0:
        return a
    return clip * torch.tanh(a / clip)




def make_norm(kind: str, dim: int) -> nn.Module:
    """A LayerNorm (weight and bias) or an RMSNorm (weight only), both eps 1e-5."""
    if kind not in architecture.NORMS:
        raise ValueError(f"norm must be one of {architecture.NORMS}, got {kind!r}")
    eps = architecture.FLOW_NORM_EPS
    return nn.RMSNorm(dim, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


def norm_float32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply `norm` in float32 whatever the compute dtype."""
    return norm(x.float()).to(x.dtype)


def rope_positions(grid: int, flip: bool) -> torch.Tensor:
    """(T, 2) integer (row, col) of each token of a grid x grid raster, in the block's token order."""
    t = torch.arange(grid * grid)
    if flip:
        t = t.flip(0)
    return torch.stack([t // grid, t % grid], dim=-1)


def rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin (T, head_dim) for `rope_positions`: the head vector is four quarters
    [r1, r2, c1, c2]; pairs (r1, r2) turn by the row, (c1, c2) by the column, at the angles
    pos * base^(-i / (head_dim / 4)) (`architecture.FLOW_ROPE`) ("rotate-half" pairing within each half)."""
    quarter = head_dim // 4
    exponents = -torch.arange(quarter, dtype=torch.float32, device=positions.device) / quarter
    freqs = architecture.FLOW_ROPE["base"] ** exponents  # float32 on the device (MPS has no float64)
    row = positions[:, :1].float() * freqs
    col = positions[:, 1:].float() * freqs
    angles = torch.cat([row, row, col, col], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (N, heads, T, head_dim) q or k by (T, head_dim) tables, in float32."""
    r1, r2, c1, c2 = x.float().chunk(4, dim=-1)
    turned = torch.cat([-r2, r1, -c2, c1], dim=-1)
    return (x.float() * cos + turned * sin).to(x.dtype)


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or an (N,) tensor, shaped to broadcast over (N, heads, queries, keys)."""
    return torch.as_tensor(value, dtype=torch.float32, device=like.device).reshape(-1, 1, 1, 1)


class KVCache:
    """Preallocated keys and values of one attention layer, filled one token at a time."""

    def __init__(self, batch: int, heads: int, num_tokens: int, head_dim: int, like: torch.Tensor):
        self.keys = like.new_zeros(batch, heads, num_tokens, head_dim)
        self.values = like.new_zeros(batch, heads, num_tokens, head_dim)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the newest token's (N, heads, 1, head_dim) key/value; return all stored so far."""
        self.keys[:, :, self.length:self.length + 1] = k
        self.values[:, :, self.length:self.length + 1] = v
        self.length += 1
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]


class Attention(nn.Module):
    """Pre-norm multi-head self-attention; softmax(q k^T / sqrt(head_dim) / temp).

    With `qk_norm`, q and k are normalised per head (one (head_dim,) norm each, shared by the
    heads); RoPE, when the caller passes its tables, turns q and k after that.
    """

    def __init__(self, channels: int, head_dim: int = 64, norm: str = "layernorm", qk_norm: bool = False):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"channels={channels} is not a multiple of head_dim={head_dim}")
        self.norm = make_norm(norm, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        if qk_norm:
            self.q_norm = make_norm(norm, head_dim)
            self.k_norm = make_norm(norm, head_dim)
        self.qk_norm = qk_norm
        self.num_heads = channels // head_dim
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, temp: float | torch.Tensor = 1.0,
                cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """With `cache`, `x` is the single newest token and attends to every cached one (the cache
        stores keys after qk-norm and RoPE). `rope`: (cos, sin) tables of `x`'s tokens."""
        n, t, c = x.shape
        h = norm_float32(self.norm, x)
        q, k, v = self.qkv(h).view(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = norm_float32(self.q_norm, q), norm_float32(self.k_norm, k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)
        logits = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
        logits = logits / _per_sample(temp, logits)
        if mask is not None:
            logits = logits.masked_fill(~mask.bool(), float("-inf"))
        weights = logits.softmax(dim=-1).to(v.dtype)
        out = (weights @ v).transpose(1, 2).reshape(n, t, c)
        return self.proj(out)


class MLP(nn.Module):
    """Pre-norm MLP with exact GELU; `main` indices 0 and 2 are the reference's names."""

    def __init__(self, channels: int, expansion: int = 4, norm: str = "layernorm"):
        super().__init__()
        self.norm = make_norm(norm, channels)
        hidden = architecture.mlp_hidden("gelu", channels, expansion)
        self.main = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(norm_float32(self.norm, x))


class SwiGLU(nn.Module):
    """Pre-norm SwiGLU MLP, down(silu(gate) * up); `gate_up` holds [gate | up] along its outputs."""

    def __init__(self, channels: int, expansion: int = 4, norm: str = "layernorm"):
        super().__init__()
        hidden = architecture.mlp_hidden("swiglu", channels, expansion)
        self.norm = make_norm(norm, channels)
        self.gate_up = nn.Linear(channels, 2 * hidden)
        self.down = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(norm_float32(self.norm, x)).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class StarflowGatedMLP(nn.Module):
    """STARFlow's gated MLP, down_proj(gelu_tanh(gate_proj(h)) * up_proj(h)), hidden C * expansion."""

    def __init__(self, channels: int, expansion: int = 4, norm: str = "layernorm"):
        super().__init__()
        self.norm = make_norm(norm, channels)
        hidden = architecture.mlp_hidden("geglu_starflow", channels, expansion)
        self.gate_proj = nn.Linear(channels, hidden)
        self.up_proj = nn.Linear(channels, hidden)
        self.down_proj = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = norm_float32(self.norm, x)
        return self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))


MLP_CLASSES = {"gelu": MLP, "swiglu": SwiGLU, "geglu_starflow": StarflowGatedMLP}


class AttentionBlock(nn.Module):
    """One transformer layer: x + attention(x), then x + mlp(x)."""

    def __init__(self, channels: int, head_dim: int = 64, expansion: int = 4, norm: str = "layernorm",
                 qk_norm: bool = False, mlp: str = "gelu"):
        super().__init__()
        if mlp not in architecture.MLPS:
            raise ValueError(f"mlp must be one of {architecture.MLPS}, got {mlp!r}")
        self.attention = Attention(channels, head_dim, norm, qk_norm)
        self.mlp = MLP_CLASSES[mlp](channels, expansion, norm)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, temp: float | torch.Tensor = 1.0,
                cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attention(x, mask, temp, cache, rope)
        return x + self.mlp(x)


class MetaBlock(nn.Module):
    """One autoregressive affine flow step; odd blocks work on the reversed token order.

    Inputs and outputs of `forward` / `reverse` are in raster order; the flip is internal.
    """

    attn_mask: torch.Tensor
    rope_positions: torch.Tensor

    def __init__(self, in_channels: int, channels: int, num_patches: int, flip: bool, num_layers: int = 1,
                 head_dim: int = 64, expansion: int = 4, num_classes: int = 0, clip: float = 0.0,
                 rope: bool = False, norm: str = "layernorm", qk_norm: bool = False, mlp: str = "gelu",
                 clip_shift: bool = False):
        super().__init__()
        self.flip = flip
        self.clip = clip
        self.clip_shift = clip_shift
        self.num_classes = num_classes
        self.rope = rope
        self.head_dim = head_dim
        self.proj_in = nn.Linear(in_channels, channels)
        if rope:  # positions enter through q and k instead
            self.register_parameter("pos_embed", None)
        else:
            self.pos_embed = nn.Parameter(torch.randn(num_patches, channels) * 1e-2)
        if num_classes:
            self.class_embed = nn.Parameter(torch.randn(num_classes, 1, channels) * 1e-2)
        else:
            self.register_parameter("class_embed", None)
        self.attn_blocks = nn.ModuleList(
            [AttentionBlock(channels, head_dim, expansion, norm, qk_norm, mlp) for _ in range(num_layers)])
        self.proj_out = nn.Linear(channels, 2 * in_channels)
        with torch.no_grad():
            self.proj_out.weight.zero_()
        self.register_buffer("attn_mask", torch.tril(torch.ones(num_patches, num_patches)))
        if rope:  # integers, so `.to(dtype)` leaves them exact; not part of the state_dict
            grid = math.isqrt(num_patches)
            self.register_buffer("rope_positions", rope_positions(grid, flip), persistent=False)

    def positions(self) -> tuple[torch.Tensor | float, tuple[torch.Tensor, torch.Tensor] | None]:
        """What carries token positions in block order: the learned `pos_embed` (T, C) added to
        the input, or (with RoPE) 0 and the (cos, sin) tables that turn q and k."""
        if self.rope:
            return 0.0, rope_tables(self.rope_positions, self.head_dim)
        return self.permute(self.pos_embed, dim=0), None

    def permute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The block's token order; a flip is its own inverse."""
        return x.flip(dim) if self.flip else x

    def condition(self, y: torch.Tensor | None) -> torch.Tensor | float:
        """Class embedding (N or 1, 1, C); a dropped label (y < 0) or no label gets the class mean."""
        if self.class_embed is None:
            return 0.0
        mean = self.class_embed.mean(dim=0, keepdim=True)
        if y is None:
            return mean
        y = y.long()
        chosen = self.class_embed[y.clamp(0, self.num_classes - 1)]
        return torch.where((y < 0).view(-1, 1, 1), mean, chosen)

    def clip_ab(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft clip of the log-scale, and of the shift too with `clip_shift` (STARFlow)."""
        return soft_clip(a, self.clip), soft_clip(b, self.clip) if self.clip_shift else b

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, T, D) -> z = (x - b) * exp(-a), and per-sample log|det| / dims (N,)."""
        x = self.permute(x)
        pos, rope = self.positions()
        h = self.proj_in(x) + pos + self.condition(y)
        for layer in self.attn_blocks:
            h = layer(h, self.attn_mask, rope=rope)
        out = self.proj_out(h).float()
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # token t sees only x[<t]
        a, b = self.clip_ab(*out.chunk(2, dim=-1))
        z = (x.float() - b) * torch.exp(-a)
        return self.permute(z.to(x.dtype)), -a.mean(dim=(1, 2))

    @torch.no_grad()
    def reverse(self, z: torch.Tensor, y: torch.Tensor | None = None, guidance: float = 0.0,
                guide_what: str = "ab", attn_temp: float = 1.0,
                annealed_guidance: bool = False) -> torch.Tensor:
        """Exact inverse, token by token with a KV cache: x[t+1] = z[t+1] * exp(a_t) + b_t.

        With guidance > 0 the conditional and unconditional (label -1, attention divided by
        `attn_temp`) branches run as one batch and a += g (a - a_u), b += g (b - b_u) for the
        parts named in `guide_what`; annealed guidance uses g_t = (t + 1) / (T - 1) * guidance.
        """
        x = self.permute(z).clone()
        n, t, _ = x.shape
        guided = guidance > 0
        labels = y
        temps: float | torch.Tensor = 1.0
        branches = 1
        if guided:
            branches = 2
            dropped = torch.full((n,), -1, dtype=torch.long, device=x.device)
            labels = torch.cat([y.long() if y is not None else dropped, dropped])
            temps = torch.cat([torch.ones(n, device=x.device), torch.full((n,), float(attn_temp), device=x.device)])
        cond = self.condition(labels)
        pos, rope = self.positions()
        first = self.attn_blocks[0].attention
        caches = [KVCache(branches * n, first.num_heads, t, first.head_dim, like=x) for _ in self.attn_blocks]
        for i in range(t - 1):
            token = x[:, i:i + 1].repeat(branches, 1, 1)
            h = self.proj_in(token) + (pos if self.rope else pos[i:i + 1]) + cond
            token_rope = None if rope is None else (rope[0][i:i + 1], rope[1][i:i + 1])
            for layer, cache in zip(self.attn_blocks, caches):
                h = layer(h, temp=temps, cache=cache, rope=token_rope)
            a, b = self.clip_ab(*self.proj_out(h[:, 0]).float().chunk(2, dim=-1))
            if guided:
                (a, a_u), (b, b_u) = a.chunk(2), b.chunk(2)
                g = (i + 1) / (t - 1) * guidance if annealed_guidance else guidance
                if "a" in guide_what:
                    a = a + g * (a - a_u)
                if "b" in guide_what:
                    b = b + g * (b - b_u)
            x[:, i + 1] = (x[:, i + 1].float() * torch.exp(a) + b).to(x.dtype)
        return self.permute(x)


class Model(nn.Module):
    """The forward flow F: NCHW images -> noise tokens, and its exact inverse.

    Constructor arguments are ml-tarflow's (`nvp` must stay True: only the affine flow is
    ported) plus our `head_dim`, `expansion` and `clip`, and the options ml-tarflow lacks
    (module docstring): `rope`, `norm`, `qk_norm`, `mlp`, `block_layers` (per-block layer
    counts in forward order, blocks.0 first; empty: `layers_per_block` for every block) and
    `clip_shift`.
    """

    var: torch.Tensor

    def __init__(self, in_channels: int, img_size: int, patch_size: int, channels: int, num_blocks: int,
                 layers_per_block: int, nvp: bool = True, num_classes: int = 0, head_dim: int = 64,
                 expansion: int = 4, clip: float = 0.0, rope: bool = False, norm: str = "layernorm",
                 qk_norm: bool = False, mlp: str = "gelu", block_layers: tuple[int, ...] | list[int] = (),
                 clip_shift: bool = False):
        super().__init__()
        if not nvp:
            raise ValueError("only the affine flow (nvp=True) is ported")
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        architecture.check_flow_options(num_blocks, head_dim, rope, norm, mlp, tuple(block_layers))
        layers = architecture.layer_counts(num_blocks, layers_per_block, block_layers)
        self.in_channels = in_channels
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.num_patches = (img_size // patch_size) ** 2
        self.token_dim = in_channels * patch_size**2
        self.blocks = nn.ModuleList([
            MetaBlock(self.token_dim, channels, self.num_patches, flip=architecture.block_flipped(i),
                      num_layers=layers[i], head_dim=head_dim, expansion=expansion, num_classes=num_classes,
                      clip=clip, rope=rope, norm=norm, qk_norm=qk_norm, mlp=mlp, clip_shift=clip_shift)
            for i in range(num_blocks)
        ])
        self.register_buffer("var", torch.ones(self.num_patches, self.token_dim))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Model:
        """Build from an exported `forward_config.json` dict; keys that are not arguments are ignored."""
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return cls(**{k: v for k, v in config.items() if k in names})

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, T, C*p*p) raster-ordered, channel-major tokens."""
        return F.unfold(x, self.patch_size, stride=self.patch_size).transpose(1, 2)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        size = (self.img_size, self.img_size)
        return F.fold(tokens.transpose(1, 2), size, self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Images -> (z tokens, tokens after every block, log|det|/dims summed over blocks (N,))."""
        expected = (self.in_channels, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected NCHW images of shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        x = self.patchify(x)
        outputs = []
        logdets = torch.zeros((), device=x.device)
        for block in self.blocks:
            x, logdet = block(x, y)
            logdets = logdets + logdet
            outputs.append(x)
        return x, outputs, logdets

    @staticmethod
    def get_loss(z: torch.Tensor, logdets: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood per dimension, the Gaussian constant dropped."""
        return 0.5 * z.pow(2).mean() - logdets.mean()

    @torch.no_grad()
    def reverse(self, z: torch.Tensor, y: torch.Tensor | None = None, guidance: float = 0.0,
                guide_what: str = "ab", attn_temp: float = 1.0, annealed_guidance: bool = False,
                return_sequence: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Noise tokens (N, T, D) -> NCHW images by the exact inverse (blocks in reverse order).

        With `return_sequence`, the images after every inverted block, starting from z.
        """
        if guidance > 0 and not self.num_classes:
            raise ValueError("guidance needs a class-conditional model (num_classes > 0)")
        if y is not None and self.num_classes:
            bad = y[(y >= self.num_classes) | (y < -1)]
            if bad.numel():
                raise ValueError(f"label {int(bad[0])} is outside [0, {self.num_classes}) (or -1 for dropped)")
        sequence = [self.unpatchify(z)]
        x = z * self.var.sqrt()
        for block in reversed(self.blocks):
            x = block.reverse(x, y, guidance, guide_what, attn_temp, annealed_guidance)
            sequence.append(self.unpatchify(x))
        return sequence if return_sequence else sequence[-1]

    @torch.no_grad()
    def sample(self, num: int, y: torch.Tensor | None = None, noise_scale: float = 1.0,
               generator: torch.Generator | None = None, **guidance: Any) -> torch.Tensor:
        """Draw z ~ N(0, noise_scale^2 I) and invert it; `guidance` goes to `reverse`."""
        ref = self.var
        z = torch.randn(num, self.num_patches, self.token_dim, generator=generator, device=ref.device,
                        dtype=ref.dtype) * noise_scale
        return self.reverse(z, y, **guidance)

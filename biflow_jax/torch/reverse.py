"""PyTorch port of BiFlow's reverse model G (`biflow_jax.models.reverse.ReverseViT`).

Why a port: G is what makes BiFlow a 1-NFE generator, so an exported BiFlow is only
useful in PyTorch if G runs there too. The maths follows the Flax model line by line
(RMSNorm in float32, QK-norm, 2D RoPE, SwiGLU, adaLN-zero on label + guidance scale,
per-stage heads, the same stage split and inference-time CFG per stage); parameter
names and layouts come from `biflow_jax.interop.reverse_layout`, which also converts the weights.

Tokens are raster-ordered (N, T, D) with channel-major patches, as in the forward port
(`biflow_jax.torch.tarflow`); images are NCHW.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from biflow_jax.architecture import REVERSE_NORM_EPS, REVERSE_ROPE, stage_sizes, swiglu_hidden

Scale = float | torch.Tensor


def rms_norm(x: torch.Tensor, eps: float = REVERSE_NORM_EPS) -> torch.Tensor:
    """Scale-free RMS normalisation over the last axis, computed in float32."""
    x32 = x.float()
    return (x32 * torch.rsqrt((x32 * x32).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel scale (`weight`)."""

    def __init__(self, dim: int, eps: float = REVERSE_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_norm(x.float(), self.eps) * self.weight.float()).to(x.dtype)


def sincos_2d_positions(grid: int, width: int) -> torch.Tensor:
    """(grid*grid, width) fixed positions: sin/cos of the row in the first half, of the column in the second."""
    if width % 4:
        raise ValueError(f"width={width} must be a multiple of 4 for 2D sin-cos positions")
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord.double()[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def rope_2d_angles(grid: int, head_dim: int, base: float = REVERSE_ROPE["base"]) -> torch.Tensor:
    """Rotary angles (T, head_dim/2): the first half rotates by the row index, the second by the column."""
    if head_dim % 4:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 4 for 2D rotary embeddings")
    quarter = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([rows.reshape(-1, 1).double() * freqs[None],
                      cols.reshape(-1, 1).double() * freqs[None]], dim=1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (j, j + head_dim/2) of x (N, T, heads, head_dim); cos/sin are (T, head_dim/2)."""
    first, second = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1).to(x.dtype)


def guidance_frequencies(w: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0
                         ) -> torch.Tensor:
    """DiT-style sinusoidal code (N, dim) of the guidance scale w (N,), scaled like a diffusion step.

    The frequency table is computed in float64 and rounded once to float32, so it is the
    same on every device and library. It matters: w * 1000 * freq reaches a few thousand
    radians, where one float32 ulp of a frequency moves cos/sin by ~1e-4, and a float32
    `exp` differs by an ulp between libraries (XLA's vs torch's) for some entries.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float64, device=w.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents).float()
    args = (w.float() * scale)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with QK-norm and 2D RoPE (no mask)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n, t, width = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.head_dim).unbind(dim=2)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(n, t, width))


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down, gate and up from one Linear (gate first)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ReverseBlock(nn.Module):
    """One layer with adaLN-zero: x + gate * f(modulate(norm(x))) for attention, then the MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.adaln = nn.Linear(width, 6 * width)
        self.attention = Attention(width, heads)
        self.mlp = SwiGLU(width, swiglu_hidden(width, mlp_ratio))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln(F.silu(cond))[:, None].chunk(6, dim=-1)
        x = x + gate_a * self.attention(modulate(rms_norm(x), shift_a, scale_a), cos, sin)
        return x + gate_m * self.mlp(modulate(rms_norm(x), shift_m, scale_m))


class StageHead(nn.Module):
    """phi_k: norm + Linear(width -> D); only the final (image) head is adaLN-modulated by c."""

    def __init__(self, width: int, token_dim: int, modulated: bool):
        super().__init__()
        if modulated:
            self.adaln = nn.Linear(width, 2 * width)
        else:
            self.norm = RMSNorm(width)
        self.modulated = modulated
        self.proj = nn.Linear(width, token_dim)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.modulated:
            shift, scale = self.adaln(F.silu(cond))[:, None].chunk(2, dim=-1)
            h = modulate(rms_norm(h), shift, scale)
        else:
            h = self.norm(h)
        return self.proj(h).float()


class ReverseModel(nn.Module):
    """G: noise tokens (N, T, D) -> B + 1 stage outputs in generation order; the last is the image.

    Constructor arguments are `ReverseViT`'s plus the forward flow's image geometry
    (patch_size, img_size, in_channels), which `decode` / `sample` need to fold tokens
    into NCHW images. Labels: y in [0, K) is a class; y = -1 (or any y < 0), y = K,
    y=None, or an unconditional model use the null row of the label table.
    """

    positions: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, num_tokens: int, token_dim: int, num_forward_blocks: int, depth: int, width: int,
                 heads: int, mlp_ratio: float = 4.0, layers_per_stage: Sequence[int] | None = None,
                 num_classes: int = 0, guidance_conditioning: bool = True, guidance_embed_dim: int = 256,
                 stage_bottleneck: bool = False, patch_size: int | None = None, img_size: int | None = None,
                 in_channels: int | None = None):
        super().__init__()
        grid = math.isqrt(num_tokens)
        if grid * grid != num_tokens:
            raise ValueError(f"num_tokens={num_tokens} is not a square token grid")
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self.num_tokens, self.token_dim, self.width = num_tokens, token_dim, width
        self.num_classes = num_classes
        self.guidance_conditioning = guidance_conditioning
        self.guidance_embed_dim = guidance_embed_dim
        self.stage_bottleneck = stage_bottleneck
        self.stage_sizes = stage_sizes(depth, num_forward_blocks, layers_per_stage)
        self.patch_size, self.img_size, self.in_channels = patch_size, img_size, in_channels

        self.embed = nn.Linear(token_dim, width)
        self.class_embed = nn.Embedding(num_classes + 1, width)
        if guidance_conditioning:
            self.guidance_mlp_in = nn.Linear(guidance_embed_dim, width)
            self.guidance_mlp_out = nn.Linear(width, width)
        self.blocks = nn.ModuleList([ReverseBlock(width, heads, mlp_ratio) for _ in range(sum(self.stage_sizes))])
        num_stages = len(self.stage_sizes)
        self.heads = nn.ModuleList([StageHead(width, token_dim, k == num_stages - 1) for k in range(num_stages)])
        if stage_bottleneck:
            self.reembed = nn.ModuleList([nn.Linear(token_dim, width) for _ in range(num_stages - 1)])
        angles = rope_2d_angles(grid, width // heads)
        self.register_buffer("positions", sincos_2d_positions(grid, width)[None], persistent=False)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ReverseModel:
        """Build from an exported `reverse_config.json` dict; keys that are not arguments are ignored.

        If the dict records the resolved `stage_sizes`, they must be the ones rebuilt here.
        """
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        model = cls(**{k: v for k, v in config.items() if k in names})
        recorded = config.get("stage_sizes")
        if recorded is not None and tuple(recorded) != model.stage_sizes:
            raise ValueError(f"config records stage_sizes={list(recorded)} but its depth/layers_per_stage "
                             f"give {list(model.stage_sizes)}")
        return model

    def label_index(self, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Row of the label table: y in [0, K) itself, anything else (or None) the null row K."""
        device = self.positions.device
        null = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if y is None or not self.num_classes:
            return null
        y = torch.as_tensor(y, device=device).long().reshape(-1).expand(batch)
        if bool((y > self.num_classes).any()):
            raise ValueError(f"label {int(y.max())} is outside [0, {self.num_classes}) (or -1 for none)")
        return torch.where((y < 0) | (y >= self.num_classes), null, y)

    def condition(self, y: torch.Tensor | None, w: Scale | None, batch: int) -> torch.Tensor:
        """c (N, width) = label embedding + MLP(sinusoid(w)); w=None means w = 0."""
        c = self.class_embed(self.label_index(y, batch))
        if self.guidance_conditioning:
            w = _per_sample(0.0 if w is None else w, batch, c.device)
            e = guidance_frequencies(w, self.guidance_embed_dim)
            c = c + self.guidance_mlp_out(F.silu(self.guidance_mlp_in(e)))
        return c

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, w: Scale | None = None,
                cfg_scale: Scale | None = None) -> list[torch.Tensor]:
        """One pass of G: the B + 1 stage outputs (N, T, D), float32, generation order.

        `w` is the trained-in guidance scale (training-time CFG, 1 NFE), scalar or (N,).
        `cfg_scale` turns on inference-time CFG (2 NFE): conditional and unconditional
        (null label, w = 0) branches run as one doubled batch, after every stage both
        hidden states become (1+s) h_c - s h_u, and the stage output is mixed the same way.
        """
        n, t, d = z.shape
        if (t, d) != (self.num_tokens, self.token_dim):
            raise ValueError(f"expected tokens (N, {self.num_tokens}, {self.token_dim}), got {tuple(z.shape)}")
        cond = self.condition(y, w, n)
        guided = cfg_scale is not None
        if guided:
            s = _per_sample(cfg_scale, n, z.device)[:, None, None]
            cond = torch.cat([cond, self.condition(None, 0.0, n)])
            z = torch.cat([z, z])

            def mix(pair: torch.Tensor) -> torch.Tensor:
                return ((1 + s) * pair[:n] - s * pair[n:]).to(pair.dtype)

        h = self.embed(z) + self.positions
        outputs: list[torch.Tensor] = []
        layers = iter(self.blocks)
        for k, size in enumerate(self.stage_sizes):
            for _ in range(size):
                h = next(layers)(h, cond, self.rope_cos, self.rope_sin)
            if guided:
                h = mix(h).repeat(2, 1, 1)
            out = self.heads[k](h, cond)
            outputs.append(mix(out) if guided else out)
            if self.stage_bottleneck and k < len(self.stage_sizes) - 1:
                routed = outputs[-1].repeat(2, 1, 1) if guided else outputs[-1]
                h = self.reembed[k](routed.to(h.dtype)) + self.positions
        return outputs

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, C*p*p) raster-ordered, channel-major tokens -> (N, C, H, W)."""
        if None in (self.patch_size, self.img_size, self.in_channels):
            raise ValueError("this ReverseModel was built without patch_size/img_size/in_channels, "
                             "so it cannot fold tokens into images")
        size = (self.img_size, self.img_size)
        return F.fold(tokens.transpose(1, 2), size, self.patch_size, stride=self.patch_size)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None, w: Scale | None = None,
               cfg_scale: Scale | None = None) -> torch.Tensor:
        """Noise tokens (N, T, D) -> NCHW images in one pass (two with `cfg_scale`); not clipped."""
        return self.unpatchify(self(z, y, w, cfg_scale)[-1])

    @torch.no_grad()
    def sample(self, num: int, y: torch.Tensor | None = None, w: Scale | None = None,
               cfg_scale: Scale | None = None, generator: torch.Generator | None = None,
               noise_scale: float = 1.0) -> torch.Tensor:
        """1-NFE sampling: z ~ N(0, noise_scale^2 I), then `decode`. Images are NCHW, not clipped
        (clip pixel images to [-1, 1]; latent-space models give unbounded VAE latents)."""
        ref = self.embed.weight
        z = torch.randn(num, self.num_tokens, self.token_dim, generator=generator, device=ref.device,
                        dtype=ref.dtype) * noise_scale
        return self.decode(z, y, w, cfg_scale)


def _per_sample(value: Scale, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or (N,) value as a float32 (N,) tensor."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1).expand(batch)

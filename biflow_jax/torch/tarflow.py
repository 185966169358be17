"""PyTorch port of our forward TARFlow, with apple/ml-tarflow's module and parameter names.

Why a port: exported weights (`biflow_jax.export`) must run where people use PyTorch, and
the same state_dict layout lets ml-tarflow checkpoints come the other way. The module tree
(`blocks.{i}.attn_blocks.{l}.attention.qkv`, ...) reproduces ml-tarflow's names exactly;
the maths reproduces *our* Flax flow (`biflow_jax.models.tarflow`), which adds two options
ml-tarflow lacks: the soft clip c*tanh(a/c) on the log-scale, and configurable head_dim /
MLP expansion. With clip=0 and the defaults the two agree.

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


def soft_clip(a: torch.Tensor, clip: float) -> torch.Tensor:
    """Bound the log-scale smoothly to (-clip, clip); clip <= 0 leaves it alone."""
    if clip <= 0:
        return a
    return clip * torch.tanh(a / clip)


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
    """Pre-LN multi-head self-attention; softmax(q k^T / sqrt(head_dim) / temp)."""

    def __init__(self, channels: int, head_dim: int = 64):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"channels={channels} is not a multiple of head_dim={head_dim}")
        self.norm = nn.LayerNorm(channels, eps=1e-5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.num_heads = channels // head_dim
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, temp: float | torch.Tensor = 1.0,
                cache: KVCache | None = None) -> torch.Tensor:
        """With `cache`, `x` is the single newest token and attends to every cached one."""
        n, t, c = x.shape
        h = self.norm(x.float()).to(x.dtype)
        q, k, v = self.qkv(h).view(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
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
    """Pre-LN MLP with exact GELU; `main` indices 0 and 2 are the reference's names."""

    def __init__(self, channels: int, expansion: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-5)
        self.main = nn.Sequential(
            nn.Linear(channels, channels * expansion),
            nn.GELU(),
            nn.Linear(channels * expansion, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(self.norm(x.float()).to(x.dtype))


class AttentionBlock(nn.Module):
    """One transformer layer: x + attention(x), then x + mlp(x)."""

    def __init__(self, channels: int, head_dim: int = 64, expansion: int = 4):
        super().__init__()
        self.attention = Attention(channels, head_dim)
        self.mlp = MLP(channels, expansion)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, temp: float | torch.Tensor = 1.0,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attention(x, mask, temp, cache)
        return x + self.mlp(x)


class MetaBlock(nn.Module):
    """One autoregressive affine flow step; odd blocks work on the reversed token order.

    Inputs and outputs of `forward` / `reverse` are in raster order; the flip is internal.
    """

    attn_mask: torch.Tensor

    def __init__(self, in_channels: int, channels: int, num_patches: int, flip: bool, num_layers: int = 1,
                 head_dim: int = 64, expansion: int = 4, num_classes: int = 0, clip: float = 0.0):
        super().__init__()
        self.flip = flip
        self.clip = clip
        self.num_classes = num_classes
        self.proj_in = nn.Linear(in_channels, channels)
        self.pos_embed = nn.Parameter(torch.randn(num_patches, channels) * 1e-2)
        if num_classes:
            self.class_embed = nn.Parameter(torch.randn(num_classes, 1, channels) * 1e-2)
        else:
            self.register_parameter("class_embed", None)
        self.attn_blocks = nn.ModuleList(
            [AttentionBlock(channels, head_dim, expansion) for _ in range(num_layers)])
        self.proj_out = nn.Linear(channels, 2 * in_channels)
        with torch.no_grad():
            self.proj_out.weight.zero_()
        self.register_buffer("attn_mask", torch.tril(torch.ones(num_patches, num_patches)))

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

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, T, D) -> z = (x - b) * exp(-a), and per-sample log|det| / dims (N,)."""
        x = self.permute(x)
        h = self.proj_in(x) + self.permute(self.pos_embed, dim=0) + self.condition(y)
        for layer in self.attn_blocks:
            h = layer(h, self.attn_mask)
        out = self.proj_out(h).float()
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # token t sees only x[<t]
        a, b = out.chunk(2, dim=-1)
        a = soft_clip(a, self.clip)
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
        pos = self.permute(self.pos_embed, dim=0)
        first = self.attn_blocks[0].attention
        caches = [KVCache(branches * n, first.num_heads, t, first.head_dim, like=x) for _ in self.attn_blocks]
        for i in range(t - 1):
            token = x[:, i:i + 1].repeat(branches, 1, 1)
            h = self.proj_in(token) + pos[i:i + 1] + cond
            for layer, cache in zip(self.attn_blocks, caches):
                h = layer(h, temp=temps, cache=cache)
            a, b = self.proj_out(h[:, 0]).float().chunk(2, dim=-1)
            a = soft_clip(a, self.clip)
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
    ported) plus our `head_dim`, `expansion` and `clip`.
    """

    var: torch.Tensor

    def __init__(self, in_channels: int, img_size: int, patch_size: int, channels: int, num_blocks: int,
                 layers_per_block: int, nvp: bool = True, num_classes: int = 0, head_dim: int = 64,
                 expansion: int = 4, clip: float = 0.0):
        super().__init__()
        if not nvp:
            raise ValueError("only the affine flow (nvp=True) is ported")
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        self.in_channels = in_channels
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.num_patches = (img_size // patch_size) ** 2
        self.token_dim = in_channels * patch_size**2
        self.blocks = nn.ModuleList([
            MetaBlock(self.token_dim, channels, self.num_patches, flip=bool(i % 2), num_layers=layers_per_block,
                      head_dim=head_dim, expansion=expansion, num_classes=num_classes, clip=clip)
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

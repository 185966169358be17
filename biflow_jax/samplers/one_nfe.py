"""Using a trained BiFlow pair (F, G): 1-NFE sampling, noise-space inpainting, class editing.

Inpainting and class editing need no training (BiFlow, arXiv:2512.10953): F maps an
image to noise, the noise is edited, G maps it back in one pass. An inpainting keeps the
known pixels: G's output fills only the unknown region (the usual convention), so the
known region of the result is the input, bit for bit.

`forward_apply(images, y) -> z tokens` and `reverse_apply(z, y) -> image tokens` are
plain callables with the parameters bound, so these functions work with any
checkpoint loader; `flow_encoder` and `reverse_decoder` build them. Outputs are not
clipped: in latent space the "images" are unbounded VAE latents; clip pixel images to
[-1, 1] before saving them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from biflow_jax.models.reverse import ReverseViT
from biflow_jax.models.tarflow import TARFlow, patchify, unpatchify

Array = jax.Array


def token_images(patch_size: int, img_size: int, channels: int) -> Callable[[Array], Array]:
    """tokens (N, T, D) -> images (N, H, W, C), the flow's `unpatchify` for one image shape."""
    return partial(unpatchify, patch_size=patch_size, height=img_size, width=img_size, channels=channels)


@partial(jax.jit, static_argnames=("model", "to_images"))
def one_nfe_sample(model: ReverseViT, params: Any, z: Array, y: Array | None, w: Array | float | None = None, *,
                   to_images: Callable[[Array], Array], cfg_scale: Array | float | None = None) -> Array:
    """Images from noise tokens z (N, T, D) with one pass of G (two with `cfg_scale`).

    `w` is the trained-in guidance scale (training-time CFG, still 1 NFE).
    `cfg_scale` turns on inference-time CFG per stage: conditional and unconditional
    branches run as one doubled batch and their hidden states are mixed,
    (1+s) h_c - s h_u, after every stage (see `ReverseViT.__call__`). Mixing only the
    final output would be the cheaper alternative; the paper's rule is per stage.
    `model` and `to_images` are static: build `to_images` once (`token_images`) and
    reuse it, or every call compiles again.
    """
    out = model.apply(params, z, y, w, cfg_scale=cfg_scale)
    return to_images(out.image_tokens)


@partial(jax.jit, static_argnames=("flow",))
def _encode(flow: TARFlow, params: Any, x: Array, y: Array | None) -> Array:
    return flow.apply(params, x, y).z


@partial(jax.jit, static_argnames=("model",))
def _decode(model: ReverseViT, params: Any, z: Array, y: Array | None, w: Array | float | None,
            cfg_scale: Array | float | None) -> Array:
    return model.apply(params, z, y, w, cfg_scale=cfg_scale).image_tokens


def flow_encoder(flow: TARFlow, params: Any) -> Callable[[Array, Array | None], Array]:
    """F as `(images, y) -> z tokens`. The params are an argument of the compiled program, not
    constants folded into it (a closure would copy every weight into the executable)."""
    return lambda x, y: _encode(flow, params, x, y)


def reverse_decoder(model: ReverseViT, params: Any, w: Array | float | None = None,
                    cfg_scale: Array | float | None = None) -> Callable[[Array, Array | None], Array]:
    """G as `(z, y) -> image tokens` at a fixed guidance setting (params an argument, as `flow_encoder`)."""
    return lambda z, y: _decode(model, params, z, y, w, cfg_scale)


def token_mask(mask: Array, patch_size: int) -> Array:
    """Image-space known-mask (N, H, W[, C]) or (H, W) -> token mask (N or 1, T, 1), boolean.

    A token counts as known only if every pixel (and channel) it covers is known: a
    partly known patch is regenerated, so no unknown pixel is ever copied from z.
    """
    mask = jnp.asarray(mask, bool)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 3:
        mask = mask[..., None]
    per_value = patchify(mask.astype(jnp.float32), patch_size)  # (N, T, C' p p)
    return jnp.all(per_value > 0.5, axis=-1, keepdims=True)


@struct.dataclass
class InpaintResult:
    """images: the known pixels of x_known with G(z') elsewhere; generated: G(z') itself;
    z_prime: the edited noise tokens; token_mask: (N, T, 1) known tokens."""

    images: Array
    generated: Array
    z_prime: Array
    token_mask: Array


def pixel_mask(mask: Array, shape: tuple[int, ...]) -> Array:
    """An image-space known-mask (N, H, W[, C]) or (H, W) broadcast to image `shape` (N, H, W, C)."""
    mask = jnp.asarray(mask, bool)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 3:
        mask = mask[..., None]
    return jnp.broadcast_to(mask, shape)


def inpaint(forward_apply: Callable[[Array, Array | None], Array],
            reverse_apply: Callable[[Array, Array | None], Array],
            x_known: Array, mask: Array, y: Array | None, rng: Array, *, patch_size: int,
            eps: Array | None = None, x_encode: Array | None = None) -> InpaintResult:
    """Noise-space inpainting: z' = M * F(x_encode) + (1 - M) * eps, then the known pixels of
    x_known pasted over G(z').

    `mask` is 1/True where x_known is known, in image space (converted by `token_mask`
    for the noise). `eps` defaults to N(0, I) from `rng`. `x_encode` is what F sees
    (default x_known): give x_known with the flow's training noise, the input G learned
    to invert. The selections are `where`s, so known tokens carry F's noise bit for bit,
    unknown tokens carry eps exactly, and known pixels are x_known exactly.
    """
    n, height, width, channels = x_known.shape
    z_known = forward_apply(x_known if x_encode is None else x_encode, y)
    if eps is None:
        eps = jax.random.normal(rng, z_known.shape, z_known.dtype)
    known = token_mask(mask, patch_size)
    z_prime = jnp.where(known, z_known, eps)
    tokens = reverse_apply(z_prime, y)
    generated = unpatchify(tokens, patch_size, height, width, channels)
    images = jnp.where(pixel_mask(mask, generated.shape), x_known.astype(generated.dtype), generated)
    return InpaintResult(images=images, generated=generated, z_prime=z_prime,
                         token_mask=jnp.broadcast_to(known, (n,) + known.shape[1:]))


def class_edit(forward_apply: Callable[[Array, Array | None], Array],
               reverse_apply: Callable[[Array, Array | None], Array],
               x: Array, y_source: Array, y_target: Array, *, patch_size: int) -> tuple[Array, Array]:
    """Class editing: z = F(x | y_source), then G(z | y_target). Returns (images, z).

    `x` is what F sees: pass images with the flow's training noise, the input G learned to invert."""
    _, height, width, channels = x.shape
    z = forward_apply(x, y_source)
    tokens = reverse_apply(z, y_target)
    return unpatchify(tokens, patch_size, height, width, channels), z


def speed_note(backend: str) -> str:
    """What a measured 1-NFE over exact-inverse speed ratio means on `backend` ('cpu', 'gpu', 'tpu').

    BiFlow's (arXiv:2512.10953) large factor is accelerator latency: the exact inverse decodes
    token by token, steps too small to fill an accelerator, while G's single pass fills it. On a
    CPU both are compute-bound, so the ratio there is mostly FLOPs and the decode loop's overhead.
    """
    if backend == "cpu":
        return ("On a CPU both models are compute-bound, so this ratio is mostly their FLOPs and the decode loop's "
                "per-token overhead; the paper's far larger factor is accelerator latency: a token-by-token decode "
                "cannot fill an accelerator, while G's single pass can (arXiv:2512.10953).")
    return ("On an accelerator the exact inverse's token-by-token decode cannot fill the chip, while G's single pass "
            "can: that latency gap, largest at batch 1, is where the paper's factor comes from (arXiv:2512.10953).")

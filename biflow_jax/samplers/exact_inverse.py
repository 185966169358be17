"""Generation with the forward flow's exact inverse (noise -> data), arXiv:2412.06329.

TARFlow has no learned reverse model: to sample, every block is inverted token by
token, x[t+1] = z[t+1] * exp(a_t) + b_t, where (a_t, b_t) come from the block's
causal transformer on x[<= t]. Three solvers compute the same inverse:

- `inverse_cached`: the KV-cached decode loop, B * (T - 1) sequential steps, each
  feeding one token (what sampling uses);
- `inverse_naive`: recomputes the whole block transformer for every token; slow,
  but shares no code path with the cache, so it is the reference the cache is
  tested against;
- `inverse_jacobi`: per block, the parallel fixed-point iteration
  x <- z * exp(a(x)) + b(x); by the triangular structure it is exact after at most
  T iterations and usually stops far earlier.

All three support classifier-free guidance (`Guidance`), run as one batch with
the conditional and unconditional halves stacked. `denoise` is the score step
that follows sampling when the flow was trained on Gaussian-noised images.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax.architecture import block_flipped
from biflow_jax.models.layers import accum_dtype
from biflow_jax.models.tarflow import TARFlow, advance_cache, block_order, unpatchify

Array = jax.Array
SOLVERS = ("cached", "jacobi", "naive")


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings (hashable: they are static under jit).

    scale: the guidance weight w (0 disables guidance and the unconditional branch).
    what: which affine output is guided, 'ab', 'a' or 'b'.
    annealed: use g_t = (t + 1) / (T - 1) * w for the token t + 1 instead of w.
    attn_temp: attention temperature of the unconditional branch (1.0 = plain CFG).
    rule: 'cfg' (a += g (a - a_u), b += g (b - b_u)) or 'starflow' (variance-aware
      combination of the two Gaussians, mu = b, sigma = exp(a)).
    """

    scale: float = 0.0
    what: str = "ab"
    annealed: bool = False
    attn_temp: float = 1.0
    rule: str = "cfg"

    def __post_init__(self):
        if self.what not in ("ab", "a", "b"):
            raise ValueError(f"guidance 'what' must be 'ab', 'a' or 'b', got {self.what!r}")
        if self.rule not in ("cfg", "starflow"):
            raise ValueError(f"guidance rule must be 'cfg' or 'starflow', got {self.rule!r}")
        if self.scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.scale}")
        if self.attn_temp <= 0:
            raise ValueError(f"attention temperature must be > 0, got {self.attn_temp}")

    @property
    def active(self) -> bool:
        return self.scale != 0

    def weight(self, position: Array | int, num_tokens: int) -> Array:
        """g for the token at `position` (block order); position 0 never needs one."""
        if not self.annealed:
            return jnp.asarray(self.scale, jnp.float32)
        return jnp.asarray(position, jnp.float32) / max(num_tokens - 1, 1) * self.scale

    def combine(self, a_c: Array, b_c: Array, a_u: Array, b_u: Array, g: Array) -> tuple[Array, Array]:
        """The guided (a, b) from the conditional and unconditional branches."""
        if self.rule == "cfg":
            a = a_c + g * (a_c - a_u)
            b = b_c + g * (b_c - b_u)
        else:
            # s = min(sigma_c / sigma_u, 1)^2 in log space; denominator >= 1 since g >= 0.
            s = jnp.exp(2.0 * jnp.minimum(a_c - a_u, 0.0))
            denom = 1.0 + g - g * s
            a = a_c - 0.5 * jnp.log(denom)
            b = ((1.0 + g) * b_c - g * s * b_u) / denom
        return (a if "a" in self.what else a_c), (b if "b" in self.what else b_c)


NO_GUIDANCE = Guidance()


# ---------------------------------------------------------------------------
# Validation (eager, before anything is traced).

def check_labels(model: TARFlow, y: Any) -> None:
    """Labels must be in [0, K) or -1 (unconditional); an unconditional model takes none."""
    if y is None or isinstance(y, jax.core.Tracer):
        return
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    bad = labels[(labels != -1) & ((labels < 0) | (labels >= model.num_classes))]
    if bad.size:
        raise ValueError(
            f"label {int(bad[0])} is out of range for a model with K={model.num_classes} classes "
            f"(allowed: 0..{model.num_classes - 1}, or -1 for unconditional)"
        )


def check_guidance(model: TARFlow, guidance: Guidance) -> None:
    """Guidance needs two different branches: labels, or an attention temperature."""
    if guidance.active and not model.num_classes and guidance.attn_temp == 1.0:
        raise ValueError(
            f"guidance scale {guidance.scale} on an unconditional model (num_classes=0): both branches "
            "would be identical; use scale 0, or attn_temp != 1 for attention-temperature guidance"
        )


def _check_tokens(model: TARFlow, z: Array) -> None:
    expected = (model.num_tokens, model.token_dim)
    if z.ndim != 3 or tuple(z.shape[1:]) != expected:
        raise ValueError(f"expected noise tokens of shape (N, {expected[0]}, {expected[1]}), got {tuple(z.shape)}")


def _validate(model: TARFlow, z: Array, y: Any, guidance: Guidance) -> None:
    _check_tokens(model, z)
    check_labels(model, y)
    check_guidance(model, guidance)
    if guidance.active and model.num_classes and y is None and guidance.attn_temp == 1.0:
        raise ValueError(f"guidance scale {guidance.scale} with labels=None on a class-conditional model: both "
                         "branches would be the unconditional model; give labels, or attn_temp != 1")
    if y is not None and np.shape(y)[0] != z.shape[0]:
        raise ValueError(f"got {np.shape(y)[0]} labels for {z.shape[0]} noise samples")


# ---------------------------------------------------------------------------
# The two branches as one batch.

def _branch_inputs(y: Array | None, n: int, guidance: Guidance) -> tuple[Array | None, Array | float]:
    """Labels and per-sample attention temperatures: [cond; uncond] when guided."""
    if not guidance.active:
        return y, 1.0
    cond = jnp.full((n,), -1, jnp.int32) if y is None else jnp.asarray(y, jnp.int32)
    labels = jnp.concatenate([cond, jnp.full((n,), -1, jnp.int32)])
    temp = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.full((n,), guidance.attn_temp, jnp.float32)])
    return labels, temp


def _stack(x: Array, guidance: Guidance) -> Array:
    return jnp.concatenate([x, x]) if guidance.active else x


def _guided(a: Array, b: Array, n: int, guidance: Guidance, g: Array) -> tuple[Array, Array]:
    if not guidance.active:
        return a, b
    return guidance.combine(a[:n], b[:n], a[n:], b[n:], g)


def _full_ab(model, params, index, x_perm, labels, temp, guidance) -> tuple[Array, Array]:
    """Guided (a, b) for every token of a block-ordered sequence, from the parallel transform."""
    n, num_tokens, _ = x_perm.shape
    a, b, _ = model.apply(params, index, _stack(x_perm, guidance), labels, temp, method=TARFlow.block_transform)
    g = guidance.weight(jnp.arange(num_tokens), num_tokens)
    return _guided(a, b, n, guidance, jnp.reshape(g, (1, -1, 1)))


# ---------------------------------------------------------------------------
# Solvers: each inverts one block; the flow inverse runs them last block first.

def prefix_segments(num_steps: int, segments: int = 0) -> list[tuple[int, int]]:
    """Split decode steps 0..num_steps-1 into contiguous [start, stop) segments.

    Step t attends to positions 0..t, so a segment ending at `stop` needs only the first
    `stop` cache rows: a static prefix length per segment (one loop per segment). 0 picks
    about one segment per 32 tokens, at most 8 (the attention reads ~(S+1)/2S of the cache).
    """
    if num_steps <= 0:
        return []
    if segments <= 0:
        segments = min(8, max(1, (num_steps + 1) // 32))
    segments = min(segments, num_steps)
    bounds = np.linspace(0, num_steps, segments + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _invert_block_cached(model, params, index, z, labels, temp, guidance, cache_dtype=None, segments=0):
    z_perm = block_order(z, block_flipped(index))
    n, num_tokens, _ = z_perm.shape
    batch = 2 * n if guidance.active else n

    def step(t, carry):
        x, cache = carry
        x_t = jax.lax.dynamic_index_in_dim(x, t, axis=1, keepdims=False)
        a, b, cache = model.apply(params, index, _stack(x_t, guidance), t, cache, labels, temp,
                                  method=TARFlow.block_decode_step)
        a, b = _guided(a, b, n, guidance, guidance.weight(t + 1, num_tokens))
        z_next = jax.lax.dynamic_index_in_dim(z_perm, t + 1, axis=1, keepdims=False)
        x_next = z_next * jnp.exp(a) + b
        x = jax.lax.dynamic_update_index_in_dim(x, x_next.astype(x.dtype), t + 1, axis=1)
        return x, cache

    # Token 0 passes through (a = b = 0), so z_perm is already right there. Each segment's
    # loop carries only its own chunk of the cache (positions start..stop-1) and reads the
    # earlier positions as a fixed-length, read-only past: no step attends beyond the filled
    # prefix, and no step copies the whole cache.
    x, cache = z_perm, None
    for start, stop in prefix_segments(num_tokens - 1, segments):
        if cache is None:
            cache = model.apply(params, batch, cache_dtype, stop - start, method=TARFlow.init_caches)[index]
        else:
            cache = advance_cache(cache, stop - start)
        x, cache = jax.lax.fori_loop(start, stop, step, (x, cache))
    return block_order(x, block_flipped(index))


def _invert_block_naive(model, params, index, z, labels, temp, guidance):
    z_perm = block_order(z, block_flipped(index))
    num_tokens = z_perm.shape[1]

    def step(t, x):
        a, b = _full_ab(model, params, index, x, labels, temp, guidance)
        a_t = jax.lax.dynamic_index_in_dim(a, t + 1, axis=1, keepdims=False)
        b_t = jax.lax.dynamic_index_in_dim(b, t + 1, axis=1, keepdims=False)
        z_next = jax.lax.dynamic_index_in_dim(z_perm, t + 1, axis=1, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(x, (z_next * jnp.exp(a_t) + b_t).astype(x.dtype), t + 1, axis=1)

    x = jax.lax.fori_loop(0, num_tokens - 1, step, z_perm)
    return block_order(x, block_flipped(index))


def _invert_block_jacobi(model, params, index, z, labels, temp, guidance, tol, max_iters):
    """Fixed-point iteration from x = z; token k is exact after k iterations."""
    z_perm = block_order(z, block_flipped(index))

    def cond(state):
        _, it, delta = state
        return (it < max_iters) & (delta > tol)

    def body(state):
        x, it, _ = state
        a, b = _full_ab(model, params, index, x, labels, temp, guidance)
        x_new = (z_perm * jnp.exp(a) + b).astype(x.dtype)
        return x_new, it + 1, jnp.max(jnp.abs(x_new - x))

    init = (z_perm, jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, z_perm.dtype))
    x, iters, _ = jax.lax.while_loop(cond, body, init)
    return block_order(x, block_flipped(index)), iters


@functools.partial(jax.jit, static_argnames=("model", "guidance", "solver", "cache_dtype", "segments"))
def _inverse_sequential(model, params, z, y, guidance, solver, cache_dtype=None, segments=0):
    labels, temp = _branch_inputs(y, z.shape[0], guidance)
    x = z.astype(accum_dtype(model.dtype))  # a, b and exp: float32, float64 for a float64 model
    for index in reversed(range(model.num_blocks)):
        if solver == "cached":
            x = _invert_block_cached(model, params, index, x, labels, temp, guidance, cache_dtype, segments)
        else:
            x = _invert_block_naive(model, params, index, x, labels, temp, guidance)
    return x


@functools.partial(jax.jit, static_argnames=("model", "guidance", "tol", "max_iters"))
def _inverse_jacobi(model, params, z, y, guidance, tol, max_iters):
    labels, temp = _branch_inputs(y, z.shape[0], guidance)
    x = z.astype(accum_dtype(model.dtype))  # a, b and exp: float32, float64 for a float64 model
    iters = [None] * model.num_blocks
    for index in reversed(range(model.num_blocks)):
        x, iters[index] = _invert_block_jacobi(model, params, index, x, labels, temp, guidance, tol, max_iters)
    return x, jnp.stack(iters)


def _cache_dtype(cache_dtype: Any) -> Any:
    """None (the model's compute dtype) or a dtype name/object -> a hashable numpy dtype or None."""
    return None if cache_dtype is None or cache_dtype == "" else jnp.dtype(cache_dtype)


def inverse_cached(model: TARFlow, params: Any, z_tokens: Array, y: Array | None = None,
                   guidance: Guidance = NO_GUIDANCE, cache_dtype: Any = None, segments: int = 0) -> Array:
    """The exact inverse F^-1(z) with the KV cache: (N, T, D) noise -> (N, T, D) tokens, raster order.

    cache_dtype: the KV cache's dtype (None: the model's compute dtype; bfloat16 halves the
    cache traffic). segments: how many decode loops with a static cache prefix each
    (`prefix_segments`; 0 = automatic, 1 = attend over the whole cache under a mask).
    """
    _validate(model, z_tokens, y, guidance)
    return _inverse_sequential(model, params, z_tokens, y, guidance, "cached", _cache_dtype(cache_dtype),
                               int(segments))


def inverse_naive(model: TARFlow, params: Any, z_tokens: Array, y: Array | None = None,
                  guidance: Guidance = NO_GUIDANCE) -> Array:
    """The exact inverse without a cache (whole transformer per token): the reference for the others."""
    _validate(model, z_tokens, y, guidance)
    return _inverse_sequential(model, params, z_tokens, y, guidance, "naive")


def inverse_jacobi(model: TARFlow, params: Any, z_tokens: Array, y: Array | None = None,
                   guidance: Guidance = NO_GUIDANCE, tol: float = 1e-4,
                   max_iters: int = 0) -> tuple[Array, Array]:
    """Block-wise Jacobi inverse: (tokens, iterations per block (B,), indexed like `blocks_{i}`).

    Stops a block when max |x_new - x| over the batch is <= tol, or after `max_iters`
    iterations (0 means T, enough for an exact result whatever tol).
    """
    _validate(model, z_tokens, y, guidance)
    max_iters = int(max_iters) or model.num_tokens
    return _inverse_jacobi(model, params, z_tokens, y, guidance, float(tol), max_iters)


def tokens_to_images(model: TARFlow, tokens: Array) -> Array:
    """(N, T, D) tokens -> (N, H, W, C) images."""
    return unpatchify(tokens, model.patch_size, model.img_size, model.img_size, model.in_channels)


def images_to_uint8(images: Array) -> np.ndarray:
    """[-1, 1] float images -> uint8 in [0, 255] (clipped)."""
    x = np.asarray(images, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Score-based denoising (Tweedie).

def log_likelihood(model: TARFlow, params: Any, x_images: Array, y: Array | None = None) -> Array:
    """log p(x) per sample in nats: Gaussian prior on z plus the summed log|det|.

    The model reports each block's log|det| divided by the number of dimensions,
    so it is multiplied back here.
    """
    out = model.apply(params, x_images, y)
    dims = math.prod(x_images.shape[1:])
    prior = -0.5 * jnp.sum(out.z**2, axis=(1, 2)) - 0.5 * dims * math.log(2 * math.pi)
    return prior + dims * jnp.sum(out.logdets, axis=1)


@functools.partial(jax.jit, static_argnames=("model",))
def _denoise(model, params, x_images, y, sigma):
    score = jax.grad(lambda x: jnp.sum(log_likelihood(model, params, x, y)))(x_images)
    return x_images + sigma**2 * score


def denoise(model: TARFlow, params: Any, x_images: Array, y: Array | None, sigma: float) -> Array:
    """One score step x + sigma^2 * grad_x log p(x): the posterior mean of clean x given
    x = clean + N(0, sigma^2) noise, when p is the density of the noised data."""
    check_labels(model, y)
    return _denoise(model, params, x_images, y, jnp.asarray(sigma, x_images.dtype))


# ---------------------------------------------------------------------------
# Noise -> images.

@functools.partial(jax.jit, static_argnames=("model", "guidance", "solver", "denoise_sigma",
                                             "jacobi_tol", "jacobi_max_iters", "cache_dtype"))
def _generate(model, params, z, y, guidance, solver, denoise_sigma, jacobi_tol, jacobi_max_iters, cache_dtype=None):
    if solver == "jacobi":
        tokens, _ = _inverse_jacobi(model, params, z, y, guidance, jacobi_tol, jacobi_max_iters)
    else:
        tokens = _inverse_sequential(model, params, z, y, guidance, solver, cache_dtype)
    images = tokens_to_images(model, tokens)
    if denoise_sigma > 0:
        images = _denoise(model, params, images, y, jnp.asarray(denoise_sigma, images.dtype))
    return images


def generate(model: TARFlow, params: Any, z_tokens: Array, y: Array | None = None,
             guidance: Guidance = NO_GUIDANCE, solver: str = "cached", denoise_sigma: float = 0.0,
             jacobi_tol: float = 1e-4, jacobi_max_iters: int = 0, cache_dtype: Any = None) -> Array:
    """Given noise tokens -> (N, H, W, C) float images (unclipped), in one jitted call.

    Inputs may be sharded over devices along the batch axis; jit keeps that sharding.
    `cache_dtype` (cached solver): the KV cache's dtype, None for the model's compute dtype.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    _validate(model, z_tokens, y, guidance)
    return _generate(model, params, z_tokens, y, guidance, solver, float(denoise_sigma),
                     float(jacobi_tol), int(jacobi_max_iters) or model.num_tokens, _cache_dtype(cache_dtype))


def sample(model: TARFlow, params: Any, rng: Array, labels: Array | None = None, num: int | None = None,
           guidance: Guidance = NO_GUIDANCE, solver: str = "cached", noise_scale: float = 1.0,
           denoise_sigma: float = 0.0, jacobi_tol: float = 1e-4, jacobi_max_iters: int = 0,
           cache_dtype: Any = None) -> Array:
    """Draw z ~ N(0, noise_scale^2 I) and map it to (N, H, W, C) images in [-1, 1] (unclipped).

    `num` defaults to len(labels); labels None samples the class-mean (unconditional) model.
    """
    if labels is not None:
        labels = np.asarray(labels)
        check_labels(model, labels)
        num = len(labels) if num is None else num
        labels = jnp.asarray(labels, jnp.int32)
    if num is None:
        raise ValueError("sample() needs labels or num")
    z = noise_scale * jax.random.normal(rng, (num, model.num_tokens, model.token_dim), jnp.float32)
    return generate(model, params, z, labels, guidance, solver, denoise_sigma, jacobi_tol, jacobi_max_iters,
                    cache_dtype)


@functools.partial(jax.jit, static_argnames=("model",))
def _encode(model, params, x_images, y):
    return model.apply(params, x_images, y).z


def encode(model: TARFlow, params: Any, x_images: Array, y: Array | None = None) -> Array:
    """F(x): images -> noise tokens; the other direction, for round trips and editing."""
    check_labels(model, y)
    return _encode(model, params, x_images, y)


__all__ = [
    "Guidance", "NO_GUIDANCE", "SOLVERS", "check_labels", "prefix_segments", "check_guidance", "inverse_cached",
    "inverse_naive",
    "inverse_jacobi", "tokens_to_images", "images_to_uint8", "log_likelihood", "denoise", "generate",
    "sample", "encode",
]

"""Stage-2 objective of BiFlow: train G to invert the frozen forward flow F (PAPERS.md section 3).

Pairing convention (shared with `models/reverse.py`): the forward trajectory is
x^0 (noised image tokens) ... x^B (= z), as in `FlowOutput.trajectory`; G's stage
k (k = 0..B-1) is paired with x^{B-1-k}; its last stage (B) predicts the final
target (the clean image tokens with learned denoising).

Distances are per-sample MSE over tokens and dims, optionally passed through the
adaptive weight d * sg((d + c)^-p) and then averaged over the batch. The returned
per-term numbers are the *raw* batch-mean MSEs (the adaptively weighted value is
close to 1 by construction, so it says nothing in a log); 'total' is the weighted
sum that is differentiated.

All functions are pure and jit-friendly; static options are keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

FINAL_TARGETS = ("clean", "noised")


def rms_normalize(x: Array, eps: float = 1e-8) -> Array:
    """Per-sample RMS normalisation over all non-batch axes: every sample gets RMS 1.

    The reverse side's norm control: forward states at different depths have very
    different scales, and normalising them makes every stage's term count equally.
    """
    axes = tuple(range(1, x.ndim))
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + eps)


def adaptive_weight(d: Array, p: float = 1.0, c: float = 0.01) -> Array:
    """d * sg((d + c)^-p): value ~ d^(1-p), gradient (d + c)^-p * grad d (the weight itself gets none)."""
    return d * jax.lax.stop_gradient((d + c) ** -p)


def per_sample_mse(prediction: Array, target: Array) -> Array:
    """(N, ...) x (N, ...) -> (N,) mean squared error over all non-batch axes."""
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(diff * diff, axis=tuple(range(1, diff.ndim)))


def _weighted_mean(d: Array, adaptive: bool, p: float, c: float) -> Array:
    return jnp.mean(adaptive_weight(d, p, c) if adaptive else d)


def _final_target(trajectory: Sequence[Array], clean_tokens: Array | None, final_target: str) -> Array:
    if final_target not in FINAL_TARGETS:
        raise ValueError(f"final_target must be one of {FINAL_TARGETS}, got {final_target!r}")
    if final_target == "noised":
        return trajectory[0]
    if clean_tokens is None:
        raise ValueError("final_target='clean' needs clean_tokens (patchified clean images)")
    return clean_tokens


def _check_pairing(stage_outputs: Sequence[Array], trajectory: Sequence[Array]) -> None:
    if len(stage_outputs) != len(trajectory):
        raise ValueError(f"G has {len(stage_outputs)} stages but the trajectory has {len(trajectory)} states; "
                         f"expected num_forward_blocks + 1 of each")


def _stage_terms(stage_outputs: Sequence[Array], trajectory: Sequence[Array], clean_tokens: Array | None, *,
                 normalize_targets: bool, final_target: str, adaptive: bool, p: float, c: float,
                 intermediate: bool) -> dict[str, Array]:
    _check_pairing(stage_outputs, trajectory)
    num_blocks = len(trajectory) - 1
    terms: dict[str, Array] = {}
    total = jnp.zeros((), jnp.float32)
    if intermediate:
        for k in range(num_blocks):
            state = trajectory[num_blocks - 1 - k]
            target = rms_normalize(state) if normalize_targets else state.astype(jnp.float32)
            d = per_sample_mse(stage_outputs[k], jax.lax.stop_gradient(target))
            terms[f"align/x{num_blocks - 1 - k}"] = jnp.mean(d)
            total = total + _weighted_mean(d, adaptive, p, c)
    target = _final_target(trajectory, clean_tokens, final_target)
    d = per_sample_mse(stage_outputs[-1], jax.lax.stop_gradient(target))
    terms["denoise"] = jnp.mean(d)
    terms["total"] = total + _weighted_mean(d, adaptive, p, c)
    return terms


def hidden_alignment_loss(stage_outputs: Sequence[Array], trajectory: Sequence[Array],
                          clean_tokens: Array | None = None, *, final_target: str = "clean",
                          adaptive: bool = True, p: float = 1.0, c: float = 0.01) -> dict[str, Array]:
    """BiFlow's objective: sum_i MSE(phi_i(h^i), rms_normalize(x^i)) + MSE(final, target).

    Keys: 'align/x{i}' per forward state, 'denoise' for the last stage, 'total'.
    `final_target`: 'clean' (learned denoising: the clean image tokens, unnormalised)
    or 'noised' (x^0 unnormalised, for a G without the denoising step).
    """
    return _stage_terms(stage_outputs, trajectory, clean_tokens, normalize_targets=True,
                        final_target=final_target, adaptive=adaptive, p=p, c=c, intermediate=True)


def hidden_distillation_loss(stage_outputs: Sequence[Array], trajectory: Sequence[Array],
                             clean_tokens: Array | None = None, *, final_target: str = "clean",
                             adaptive: bool = True, p: float = 1.0, c: float = 0.01) -> dict[str, Array]:
    """Ablation: every stage output is forced onto the *unnormalised* x^i.

    Our reading of "forcing hidden states into input space": train a G built with
    `stage_bottleneck=True`, whose hidden stream passes through each stage's
    token-space output, so G's intermediate states are literally the distilled x^i.
    With a plain G this is hidden alignment without reverse-side norm control.
    """
    return _stage_terms(stage_outputs, trajectory, clean_tokens, normalize_targets=False,
                        final_target=final_target, adaptive=adaptive, p=p, c=c, intermediate=True)


def naive_distillation_loss(stage_outputs: Sequence[Array], trajectory: Sequence[Array],
                            clean_tokens: Array | None = None, *, final_target: str = "clean",
                            adaptive: bool = True, p: float = 1.0, c: float = 0.01) -> dict[str, Array]:
    """Ablation: only D(x, G(F(x))) on the final output; intermediate heads get no loss."""
    return _stage_terms(stage_outputs, trajectory, clean_tokens, normalize_targets=True,
                        final_target=final_target, adaptive=adaptive, p=p, c=c, intermediate=False)


OBJECTIVES: dict[str, Callable[..., dict[str, Array]]] = {
    "hidden_alignment": hidden_alignment_loss,
    "hidden_distillation": hidden_distillation_loss,
    "naive_distillation": naive_distillation_loss,
}


def cfg_combine(pred_cond_w: Array, pred_uncond: Array, w: Array | float) -> Array:
    """Training-time CFG: [G(h|c,w) + w * sg(G(h|none))] / (1 + w), w per sample (N,) or scalar.

    This combination is what gets matched to the conditional target, so at the
    optimum G(h|c,w) = (1 + w) target - w G(h|none): the CFG-guided prediction,
    produced by a single conditional pass at sampling time.
    """
    w = jnp.asarray(w, jnp.float32)
    w = jnp.reshape(w, w.shape + (1,) * (pred_cond_w.ndim - w.ndim)) if w.ndim else w
    return (pred_cond_w + w * jax.lax.stop_gradient(pred_uncond)) / (1 + w)


def sample_guidance_scale(rng: Array, n: int, w_min: float = 0.0, w_max: float = 4.0,
                          p_zero: float = 0.0) -> Array:
    """(n,) guidance scales ~ U[w_min, w_max], each set to 0 with probability p_zero."""
    rng_w, rng_zero = jax.random.split(rng)
    w = jax.random.uniform(rng_w, (n,), jnp.float32, w_min, w_max)
    return jnp.where(jax.random.uniform(rng_zero, (n,)) < p_zero, 0.0, w)


def guided_training_outputs(reverse_apply: Callable[..., Any], z: Array, y: Array, w: Array) -> tuple[Array, ...]:
    """G's stage outputs with training-time CFG applied to every stage output.

    `reverse_apply(z, y, w)` returns a `ReverseOutput` (e.g. a partial of
    `model.apply` with params). The conditional branch is G(z | y, w); the
    unconditional branch is G(z | null label, w=0) and receives no gradient (its
    outputs are stop-gradient, and it runs as a separate call so no backward pass is
    spent on it). Samples whose label is dropped (y < 0) use w = 0, so for them the
    combination is just G(z | null, 0) trained on its own. Each stage output of the
    combination is matched to the same target as without CFG (the trajectory of F
    on the true image), so every stage learns its own guided prediction.
    """
    w = jnp.where(jnp.asarray(y) < 0, 0.0, jnp.broadcast_to(jnp.asarray(w, jnp.float32), (z.shape[0],)))
    cond = reverse_apply(z, y, w)
    uncond = reverse_apply(z, jnp.full_like(jnp.asarray(y), -1), jnp.zeros_like(w))
    return tuple(cfg_combine(c_out, u_out, w) for c_out, u_out in zip(cond.stage_outputs, uncond.stage_outputs))

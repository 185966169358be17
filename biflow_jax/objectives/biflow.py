"""Stage 2 of BiFlow (arXiv:2512.10953): train the reverse model G to invert a frozen flow F.

F comes from a finished stage-1 run and is never trained here: its parameters reach the
jitted step as frozen arguments, and its trajectory x^0 = x~, x^1, ..., x^B = z is computed
inside the step under stop_gradient. G maps z to every x^i (hidden alignment) and finally
to the clean image (learned denoising), optionally with training-time CFG.

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

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from biflow_jax import latent_space, likelihood
from biflow_jax.checkpoint import section_differences
from biflow_jax.config_checks import validate_loop
from biflow_jax.errors import ConfigError, require
from biflow_jax.models import registry
from biflow_jax.models.reverse import ReverseViT
from biflow_jax.models.tarflow import TARFlow, patchify
from biflow_jax.objectives import Objective, perceptual
from biflow_jax.objectives.flow import flow_inputs
from biflow_jax.sharding import example_keys

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


def sample_guidance_scale(keys: Array, w_min: float = 0.0, w_max: float = 4.0) -> Array:
    """(N,) guidance scales ~ U[w_min, w_max] for training-time CFG, one per example key (N,), so a
    sample's w does not depend on how the batch is split over devices."""
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, w_min, w_max))(keys)


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


# ---------------------------------------------------------------------------
# The stage-2 training objective.

# Keys of the data section that must agree with the stage-1 run G inverts.
MATCHING_DATA_KEYS = ("name", "image_size", "channels", "num_classes")
SAME_RUN_KEYS = ("biflow.model", "biflow.objective", "data.name")


def validate(config: ml_collections.ConfigDict) -> None:
    """Stage 2's own section: objective, guidance range, loop."""
    b = config.biflow
    require(b.objective in OBJECTIVES, f"biflow.objective={b.objective!r} must be one of {sorted(OBJECTIVES)}")
    require(0.0 <= b.w_min <= b.w_max, f"biflow.w_min={b.w_min} / w_max={b.w_max} must satisfy 0 <= min <= max")
    require(0.0 <= b.label_drop < 1.0, f"biflow.label_drop={b.label_drop} must be in [0, 1)")
    registry.reverse_fields(b.model)
    if "perceptual" in b:
        perceptual.validate(b.perceptual)  # every missing weights file, named, before anything is written
    validate_loop(b.train, b.optim, "biflow.train")


def check_flow_matches(config: ml_collections.ConfigDict, flow_config: ml_collections.ConfigDict,
                       flow_workdir: str) -> None:
    """The data and classes of this config must be those the stage-1 flow was trained on."""
    diffs = section_differences(flow_config.model, config.model, "model.")
    diffs += [f"data.{k}: {flow_config.data.get(k)!r} -> {config.data.get(k)!r}" for k in MATCHING_DATA_KEYS
              if flow_config.data.get(k) != config.data.get(k)]
    if diffs:
        raise ConfigError(f"the stage-1 run in {flow_workdir!r} does not match this config (stage-1 value -> this "
                          "config's): " + "; ".join(diffs) + ". G's classes and tokens come from the flow it inverts.")


def build_reverse(config: ml_collections.ConfigDict, flow: TARFlow) -> ReverseViT:
    return registry.build_reverse(config.biflow.model, flow)


def init_reverse(reverse: ReverseViT, flow: TARFlow, rng: jax.Array) -> Any:
    return reverse.init(rng, *registry.reverse_example_inputs(flow))


def make(config: ml_collections.ConfigDict, flow_run: Any, image_fn: perceptual.ImageFn | None = None,
         perceptual_terms: tuple[perceptual.PerceptualLoss, Any] | None = None,
         decoder: latent_space.LatentDecoder | None = None) -> Objective:
    """Hidden alignment + learned denoising (+ training-time CFG) against `flow_run`.

    flow_run: the frozen stage-1 run (`.model`, `.params`, `.config`, `.workdir`; biflow_jax.runs).
    The noise that makes x~ is the flow's own training noise (its config's train section).
    With `biflow.perceptual` terms on, they compare `image_fn(G's final tokens, frozen)` with
    the clean image; `image_fn` defaults to unpatchify (pixel space) and the networks' params
    travel in `frozen['perceptual']`. `perceptual_terms`: a built (loss, params) used instead
    of reading the config's weights files (benchmarks with random networks); `decoder` a built VAE
    decoder used instead of loading the config's (`--mode=compile` passes one with abstract params).
    """
    b = config.biflow
    flow, flow_config = flow_run.model, flow_run.config
    check_flow_matches(config, flow_config, flow_run.workdir)
    reverse = build_reverse(config, flow)
    loss_terms = OBJECTIVES[b.objective]
    noise = ml_collections.ConfigDict(dict(noise=flow_config.train.noise, noise_std=flow_config.train.noise_std,
                                           label_drop=b.label_drop))
    weighting = functools.partial(adaptive_weight, p=b.adaptive_p, c=b.adaptive_c) if b.adaptive else None
    built = perceptual_terms or (perceptual.build(b.perceptual, weighting) if "perceptual" in b else None)
    data = config.data
    latent = config.get("latent") if latent_space.enabled(config) else None
    if decoder is None and latent is not None and built is not None:
        decoder = latent_space.load_decoder(config)
    elif latent is None or built is None:
        decoder = None
    if decoder is not None:  # perceptual terms compare VAE-decoded images
        image_fn = image_fn or latent_space.token_image_fn(decoder, flow.patch_size, data.image_size, data.channels,
                                                           remat=bool(b.perceptual.get("remat", False)))
    image_fn = image_fn or perceptual.pixel_image_fn(flow.patch_size, data.image_size, data.image_size, data.channels)
    frozen = {"flow": flow_run.params}
    if decoder is not None:
        frozen["vae"] = decoder.params
    if built is not None:
        frozen["perceptual"] = built[1]

    def loss(params, batch, rng, index, frozen):
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(example_keys(rng, index))
        x, y = flow_inputs(noise, flow.num_classes, batch, keys[:, :2], latent)
        trajectory = jax.lax.stop_gradient(flow.apply(frozen["flow"], x, y).trajectory)
        clean_x = (latent_space.clean_latents(keys[:, 0], batch, latent) if latent is not None
                   else likelihood.to_unit_range(batch["image"]))  # latents: the sample x~ was noised from
        clean = patchify(clean_x, flow.patch_size)

        def apply(z, labels, w):
            return reverse.apply(params, z, labels, w)

        if b.cfg_training:
            w = sample_guidance_scale(keys[:, 2], b.w_min, b.w_max)
            stages = guided_training_outputs(apply, trajectory[-1], y, w)
        else:
            stages = apply(trajectory[-1], y, None).stage_outputs
        terms = loss_terms(stages, trajectory, clean, final_target="clean", adaptive=b.adaptive,
                           p=b.adaptive_p, c=b.adaptive_c)
        metrics = {k.replace("/", "_"): v for k, v in terms.items() if k != "total"}
        total = terms["total"]
        if built is not None:
            crop_keys = jax.vmap(lambda k: jax.random.fold_in(k, 3))(example_keys(rng, index))

            def distances(tokens, clean_images, keys):
                real = decoder.decode(frozen["vae"], clean_images) if decoder is not None else clean_images
                return built[0].distances(frozen["perceptual"], image_fn(tokens, frozen), real, keys)

            chunk = int(b.perceptual.get("chunk", 0)) if "perceptual" in b else 0
            extra, extra_metrics = built[0].combine(perceptual.in_chunks(distances, chunk, stages[-1], clean_x,
                                                                         crop_keys))
            total = total + extra
            metrics.update(extra_metrics)
        metrics["loss"] = total
        return total, metrics

    require(not b.cfg_training or flow.num_classes > 0,
            "biflow.cfg_training needs a class-conditional flow (model.num_classes > 0)")
    return Objective(name="biflow", init=lambda rng: init_reverse(reverse, flow, rng), loss=loss,
                     flow_params=lambda params: None, frozen=frozen,
                     same_run_keys=SAME_RUN_KEYS)

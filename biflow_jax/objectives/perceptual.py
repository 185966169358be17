"""BiFlow's perceptual distances on G's final image (arXiv:2512.10953).

In the paper's ablation the distance on the final image is the largest single lever: MSE
alone, + LPIPS, + LPIPS + ConvNeXt-V2 features. The recipe, per pair (generated, real):
one random-resized crop box (area scale 0.08-1, aspect 3/4-4/3, as torchvision's
RandomResizedCrop draws it) cut from BOTH images and resized to `crop_size` px with an
antialiased bicubic kernel; then

- LPIPS-VGG (arXiv:1801.03924) between the two crops (weight 0.4 in the paper),
- ConvNeXt-V2 (arXiv:2301.00808) pooled, layer-normed features compared by squared L2
  (weight 0.1); its input is ImageNet-normalised by default (`convnext.normalize='imagenet'`,
  the statistics the checkpoint was trained with), or the [-1, 1] crops as they are
  (`'none'`, as the BiFlow group's pMF code, Lyy-iiis/pMF, feeds them),
- optionally a DINOv2 distance: squared L2 between the final-LayerNorm CLS tokens
  (off by default; not in the paper's recipe),

each per sample through the adaptive weight d * sg((d + c)^-p) (`biflow.adaptive_weight`,
passed in as `weighting`),
averaged over the batch and multiplied by its own weight.

The networks are frozen: their params reach the jitted step as frozen arguments (the
Objective's `frozen["perceptual"]`, one entry per term), are wrapped in stop_gradient, and
the real image's features are computed without a backward pass. Gradients reach G only
through the generated image, i.e. through `image_fn` (pixel space: unpatchify; latent
space: a frozen decoder the caller supplies). `remat=True` recomputes each network's
activations in the backward pass (jax.checkpoint) instead of storing them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from biflow_jax.errors import require
from biflow_jax.models.convnext import ConvNeXtV2, imagenet_normalize
from biflow_jax.models.dino import Dinov2
from biflow_jax.models.tarflow import unpatchify
from biflow_jax.models.vgg import LPIPS_SCALE, LPIPS_SHIFT, VGG16Features, unit_normalize

Array = jax.Array
# (params, generated crops, real crops) -> (N,) distances; crops are NHWC RGB in [-1, 1].
Distance = Callable[[Any, Array, Array], Array]
# (G's final tokens, the Objective's frozen dict) -> NHWC images in [-1, 1], differentiable in the tokens.
ImageFn = Callable[[Array, Any], Array]

TERMS = ("lpips", "convnext", "dino")
CONVNEXT_INPUTS = ("imagenet", "none")  # biflow.perceptual.convnext.normalize
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------
# Paired random-resized crops.

def sample_crop_box(key: Array, height: int, width: int, scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> Array:
    """(4,) float32 integer-valued box (top, left, height, width), drawn as RandomResizedCrop does.

    Up to `tries` candidates (area ~ U(scale) * H * W, log aspect ~ U(log ratio), sides
    rounded); the first that fits is used, else the centred crop of the whole image with its
    aspect clamped to `ratio`. Branch-free, so it jits and vmaps.
    """
    k_area, k_aspect, k_top, k_left = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (tries,), jnp.float32, scale[0], scale[1]) * (height * width)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (tries,), jnp.float32, math.log(ratio[0]), math.log(ratio[1])))
    w = jnp.round(jnp.sqrt(area * aspect))
    h = jnp.round(jnp.sqrt(area / aspect))
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = jnp.argmax(fits)
    found = jnp.any(fits)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    h = jnp.where(found, h[first], float(fallback_h))
    w = jnp.where(found, w[first], float(fallback_w))
    top = jnp.floor(jax.random.uniform(k_top, ()) * (height - h + 1))
    left = jnp.floor(jax.random.uniform(k_left, ()) * (width - w + 1))
    top = jnp.where(found, top, float((height - fallback_h) // 2))
    left = jnp.where(found, left, float((width - fallback_w) // 2))
    return jnp.stack([top, left, h, w])


def sample_crop_boxes(keys: Array, height: int, width: int, scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Array:
    """(N, 4) boxes, one per example key (N,): the crops do not depend on how the batch is split."""
    return jax.vmap(lambda k: sample_crop_box(k, height, width, scale, ratio))(keys)


def _cubic(x: Array, a: float = -0.5) -> Array:
    x = jnp.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return jnp.where(x < 1, near, jnp.where(x < 2, far, 0.0))


def crop_resize_matrix(start: Array, length: Array, n_in: int, n_out: int) -> Array:
    """(n_out, n_in) weights: pixels [start, start + length) resized to n_out, bicubic, antialiased.

    torch's F.interpolate(mode='bicubic', antialias=True) of the cropped axis (the taps
    PIL and torchvision use: Keys a = -0.5, widened by the downscale factor, renormalised over
    the taps inside the crop), as a dense matrix so the box can be traced; pixels outside the
    crop get weight 0.
    """
    start, length = start.astype(jnp.float32), length.astype(jnp.float32)
    scale = length / n_out
    support = jnp.where(scale >= 1, 2.0 * scale, 2.0)
    inv_scale = jnp.where(scale >= 1, 1.0 / scale, 1.0)
    center = scale * (jnp.arange(n_out, dtype=jnp.float32) + 0.5)[:, None]
    lo = jnp.maximum(jnp.floor(center - support + 0.5), 0.0)
    hi = jnp.minimum(jnp.floor(center + support + 0.5), length)
    tap = jnp.arange(n_in, dtype=jnp.float32)[None, :] - start  # position inside the crop
    weights = jnp.where((tap >= lo) & (tap < hi), _cubic((tap - center + 0.5) * inv_scale), 0.0)
    total = jnp.sum(weights, axis=1, keepdims=True)
    return weights / jnp.where(total == 0, 1.0, total)


def resized_crops(images: Array, boxes: Array, size: int) -> Array:
    """(N, H, W, C) images, (N, 4) boxes (top, left, height, width) -> (N, size, size, C).

    Each box cut out and resized as torchvision's RandomResizedCrop does it (crop, then
    antialiased bicubic); linear in the images, so gradients flow back to them; the boxes get none.
    """
    boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
    _, height, width, _ = images.shape
    rows = jax.vmap(lambda b: crop_resize_matrix(b[0], b[2], height, size))(boxes)
    cols = jax.vmap(lambda b: crop_resize_matrix(b[1], b[3], width, size))(boxes)
    hi = jax.lax.Precision.HIGHEST
    return jnp.einsum("nyh,nhwc,nxw->nyxc", rows, images.astype(jnp.float32), cols, precision=hi)


def paired_random_resized_crops(keys: Array, generated: Array, real: Array, size: int = 224,
                                scale: tuple[float, float] = (0.08, 1.0),
                                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[Array, Array]:
    """The same random box (one per example key) cut from the generated and the real image, resized to size^2."""
    if generated.shape != real.shape:
        raise ValueError(f"generated {generated.shape} and real {real.shape} images must have one shape")
    _, height, width, _ = generated.shape
    boxes = sample_crop_boxes(keys, height, width, scale, ratio)
    return resized_crops(generated, boxes, size), resized_crops(real, boxes, size)


def to_rgb(images: Array) -> Array:
    """Grey (C = 1) images repeated to three channels; RGB passes through."""
    if images.shape[-1] == 1:
        return jnp.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"perceptual networks take grey or RGB images, got {images.shape[-1]} channels")
    return images


# ---------------------------------------------------------------------------
# The distances. Each runs the real crops through the network without a backward pass.

def lpips_distance(dtype: Any = jnp.float32) -> Distance:
    """LPIPS-VGG on `models.vgg.LPIPS`'s params tree ({'vgg': ..., 'lin0'..'lin4'}), = LPIPS().apply.

    Computed tap by tap here (not through `LPIPS.__call__`, which runs both images as one
    batch) so that the real image's trunk pass is outside the gradient.
    """
    trunk = VGG16Features(dtype=dtype)
    shift, scale = jnp.asarray(LPIPS_SHIFT, jnp.float32), jnp.asarray(LPIPS_SCALE, jnp.float32)

    def taps(params: Any, x: Array) -> tuple[Array, ...]:
        return trunk.apply({"params": params["vgg"]}, (x.astype(jnp.float32) - shift) / scale)

    def distance(params: Any, generated: Array, real: Array) -> Array:
        fake_taps = taps(params, generated)
        real_taps = jax.lax.stop_gradient(taps(params, real))
        total = jnp.zeros((generated.shape[0],), jnp.float32)
        for k, (a, b) in enumerate(zip(fake_taps, real_taps)):
            diff = jnp.square(unit_normalize(a.astype(jnp.float32)) - unit_normalize(b.astype(jnp.float32)))
            total = total + jnp.mean(diff @ params[f"lin{k}"]["kernel"].astype(jnp.float32), axis=(1, 2, 3))
        return total

    return distance


def convnext_distance(model: ConvNeXtV2, normalize: str = "imagenet") -> Distance:
    """Squared L2 between ConvNeXt-V2 pooled, layer-normed features; the input is ImageNet-normalised
    (`normalize='imagenet'`) or the [-1, 1] crops unchanged (`'none'`, pMF's choice)."""
    if normalize not in CONVNEXT_INPUTS:
        raise ValueError(f"biflow.perceptual.convnext.normalize={normalize!r} must be one of {CONVNEXT_INPUTS}")
    prepare = imagenet_normalize if normalize == "imagenet" else (lambda x: x)

    def features(params: Any, x: Array) -> Array:
        return model.apply({"params": params}, prepare(x.astype(jnp.float32))).astype(jnp.float32)

    def distance(params: Any, generated: Array, real: Array) -> Array:
        diff = features(params, generated) - jax.lax.stop_gradient(features(params, real))
        return jnp.sum(diff * diff, axis=-1)

    return distance


def dino_distance(model: Dinov2) -> Distance:
    """Squared L2 between DINOv2's final-LayerNorm CLS tokens (ImageNet-normalised input)."""

    def features(params: Any, x: Array) -> Array:
        return model.apply({"params": params}, imagenet_normalize(x.astype(jnp.float32))).cls.astype(jnp.float32)

    def distance(params: Any, generated: Array, real: Array) -> Array:
        diff = features(params, generated) - jax.lax.stop_gradient(features(params, real))
        return jnp.sum(diff * diff, axis=-1)

    return distance


# ---------------------------------------------------------------------------
# The loss.

@dataclasses.dataclass(frozen=True)
class Term:
    """One perceptual term: its name (the key of its params in `frozen['perceptual']`), weight, distance."""

    name: str
    weight: float
    distance: Distance


@dataclasses.dataclass(frozen=True)
class PerceptualLoss:
    """sum_k weight_k * mean_batch(adaptive(d_k)) over the terms, on paired random-resized crops.

    `weighting`: the per-sample weighting, stage 2's adaptive weight d * sg((d + c)^-p)
    (`biflow.adaptive_weight` with the config's p and c; None: the plain distance).
    `__call__(params, generated, real, keys) -> (total, metrics)`: params maps each term's name
    to its network's params, keys are (N,) per-example keys for the crop boxes; metrics hold
    each term's raw batch-mean distance ('perceptual_<name>'), since the adaptively weighted
    value is ~1 by construction.
    """

    terms: tuple[Term, ...]
    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    weighting: Callable[[Array], Array] | None = None
    remat: bool = False

    def __call__(self, params: Mapping[str, Any], generated: Array, real: Array,
                 keys: Array) -> tuple[Array, dict[str, Array]]:
        return self.combine(self.distances(params, generated, real, keys))

    def distances(self, params: Mapping[str, Any], generated: Array, real: Array, keys: Array) -> dict[str, Array]:
        """Each term's (N,) per-sample distance on the paired crops."""
        fake, ref = paired_random_resized_crops(keys, to_rgb(generated), jax.lax.stop_gradient(to_rgb(real)),
                                                self.crop_size, tuple(self.crop_scale), tuple(self.crop_ratio))
        out = {}
        for term in self.terms:
            distance = jax.checkpoint(term.distance) if self.remat else term.distance
            out[term.name] = distance(jax.lax.stop_gradient(params[term.name]), fake, ref)
        return out

    def combine(self, distances: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
        """(sum_k weight_k * mean(weighting(d_k)), metrics) from the per-sample distances."""
        total = jnp.zeros((), jnp.float32)
        metrics: dict[str, Array] = {}
        for term in self.terms:
            d = distances[term.name]
            metrics[f"perceptual_{term.name}"] = jnp.mean(d)
            weighted = d if self.weighting is None else self.weighting(d)
            total = total + term.weight * jnp.mean(weighted)
        return total, metrics


def in_chunks(fn: Callable[..., Any], chunk: int, *args: Array) -> Any:
    """fn(*args) over the leading (batch) axis in chunks of `chunk` samples, each chunk under
    jax.checkpoint inside one lax.map: the backward pass keeps only the chunks' inputs and recomputes
    one chunk at a time, so the networks' activations (a 256-px VAE decode and two perceptual
    networks on 224-px crops) are held for `chunk` samples instead of the whole per-device batch.
    Same values and gradients as fn(*args) for per-sample fns; chunk <= 0 or >= N runs it whole."""
    n = args[0].shape[0]
    if chunk <= 0 or chunk >= n:
        return fn(*args)
    if n % chunk:
        raise ValueError(f"biflow.perceptual.chunk={chunk} must divide the per-device batch {n}")
    split = [a.reshape((n // chunk, chunk) + a.shape[1:]) for a in args]
    out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), split)
    return jax.tree_util.tree_map(lambda v: v.reshape((n,) + v.shape[2:]), out)


def pixel_image_fn(patch_size: int, height: int, width: int, channels: int) -> ImageFn:
    """Pixel space: G's final tokens are the image's patches (unpatchify; frozen unused)."""
    return lambda tokens, frozen: unpatchify(tokens, patch_size, height, width, channels)


# ---------------------------------------------------------------------------
# From config: which files each enabled term needs, and building the loss.

def enabled_terms(section: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The terms with a weight > 0 (weight 0 turns a term off)."""
    return tuple(name for name in TERMS if float(section[name].weight) > 0)


def needed_files(section: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
    """(config key, path, what it must be) for every weights file the enabled terms read."""
    needed = []
    for name in enabled_terms(section):
        term = section[name]
        if name == "lpips":
            needed.append(("biflow.perceptual.lpips.vgg16_path", term.vgg16_path,
                           "a torchvision vgg16 state_dict, e.g. vgg16-397923af.pth"))
            if term.lin_path:  # empty: the calibration shipped inside the installed lpips package
                needed.append(("biflow.perceptual.lpips.lin_path", term.lin_path,
                               "the lpips package's weights/v0.1/vgg.pth"))
        elif name == "convnext":
            needed.append(("biflow.perceptual.convnext.path", term.path,
                           "a save_pretrained directory of facebook/convnextv2-base-22k-224"))
        else:
            needed.append(("biflow.perceptual.dino.path", term.path,
                           "a transformers DINOv2 directory (e.g. facebook/dinov2-base) or a torch-hub .pth"))
    return needed


def validate(section: ml_collections.ConfigDict) -> None:
    """Crop and dtype settings, then every enabled term's weights files (nothing is read or written)."""
    require(all(float(section[name].weight) >= 0 for name in TERMS),
            "biflow.perceptual.{lpips,convnext,dino}.weight must be >= 0 (0 turns a term off)")
    lo, hi = section.crop_scale
    require(0 < lo <= hi <= 1,
            f"biflow.perceptual.crop_scale={tuple(section.crop_scale)} must satisfy 0 < lo <= hi <= 1")
    lo, hi = section.crop_ratio
    require(0 < lo <= hi, f"biflow.perceptual.crop_ratio={tuple(section.crop_ratio)} must satisfy 0 < lo <= hi")
    require(int(section.crop_size) >= 32, f"biflow.perceptual.crop_size={section.crop_size} must be >= 32 px "
            "(ConvNeXt's patchify and three 2x downsamplings need 32)")
    require(section.dtype in DTYPES, f"biflow.perceptual.dtype={section.dtype!r} must be one of {sorted(DTYPES)}")
    require(int(section.get("chunk", 0)) >= 0,
            f"biflow.perceptual.chunk={section.get('chunk')} must be >= 0 (0: the whole per-device batch at once)")
    normalize = section.convnext.get("normalize", "imagenet")
    require(normalize in CONVNEXT_INPUTS,
            f"biflow.perceptual.convnext.normalize={normalize!r} must be one of {CONVNEXT_INPUTS}")
    check_files(section)


def check_files(section: ml_collections.ConfigDict) -> None:
    """FileNotFoundError naming EVERY missing weights file of the enabled terms (and its config key)."""
    missing = []
    for key, path, what in needed_files(section):
        if not path:
            missing.append(f"{key} is empty: give {what}")
        elif not os.path.exists(path):
            missing.append(f"{key}={path!r} does not exist: give {what}")
    if "lpips" in enabled_terms(section) and not section.lpips.lin_path:
        try:
            from biflow_jax.interop.lpips_weights import shipped_lin_path

            shipped_lin_path()
        except FileNotFoundError as e:
            missing.append(f"biflow.perceptual.lpips.lin_path is empty and {e}")
    if missing:
        raise FileNotFoundError("stage 2's perceptual terms need weights files (or set their weight to 0): "
                                + "; ".join(missing))


def build(section: ml_collections.ConfigDict,
          weighting: Callable[[Array], Array] | None = None) -> tuple[PerceptualLoss, dict[str, Any]] | None:
    """(loss, {term name: params}) from `config.biflow.perceptual`, reading the weights; None when all are off."""
    names = enabled_terms(section)
    if not names:
        return None
    check_files(section)
    dtype = DTYPES[section.dtype]
    distances, params = {}, {}
    for name in names:
        cfg = section[name]
        if name == "lpips":
            from biflow_jax.interop.lpips_weights import load_lpips

            params[name] = load_lpips(cfg.vgg16_path, cfg.lin_path or None)
            distances[name] = lpips_distance(dtype)
        elif name == "convnext":
            from biflow_jax.interop.convnext_weights import load_convnext

            convnext_config, params[name] = load_convnext(cfg.path)
            distances[name] = convnext_distance(ConvNeXtV2(convnext_config, dtype=dtype, remat=bool(section.remat)),
                                                cfg.get("normalize", "imagenet"))
        else:
            from biflow_jax.interop.dino_weights import load_dino

            size = None if os.path.isdir(cfg.path) else cfg.size
            dino_config, params[name] = load_dino(cfg.path, size=size)
            distances[name] = dino_distance(Dinov2(dino_config, dtype=dtype))
    return assemble(section, distances, weighting), jax.tree_util.tree_map(jnp.asarray, params)


def build_abstract(section: ml_collections.ConfigDict, weighting: Callable[[Array], Array] | None = None
                   ) -> tuple[PerceptualLoss, dict[str, Any]] | None:
    """As `build`, with the published architectures (VGG16 + LPIPS, ConvNeXt-V2-Base, the named DINOv2)
    and their params as ShapeDtypeStructs: no weights file is read (`--mode=compile`)."""
    from biflow_jax.models.convnext import convnext_config
    from biflow_jax.models.dino import dinov2_config
    from biflow_jax.models.vgg import LPIPS

    names = enabled_terms(section)
    if not names:
        return None
    dtype = DTYPES[section.dtype]
    crop = jax.ShapeDtypeStruct((1, int(section.crop_size), int(section.crop_size), 3), jnp.float32)
    distances, params = {}, {}
    for name in names:
        if name == "lpips":
            model, distances[name] = LPIPS(), lpips_distance(dtype)
            params[name] = jax.eval_shape(model.init, jax.random.key(0), crop, crop)["params"]
            continue
        model = (ConvNeXtV2(convnext_config("base"), dtype=dtype, remat=bool(section.remat)) if name == "convnext"
                 else Dinov2(dinov2_config(section[name].size), dtype=dtype))
        distances[name] = (convnext_distance(model, section[name].get("normalize", "imagenet")) if name == "convnext"
                           else dino_distance(model))
        params[name] = jax.eval_shape(model.init, jax.random.key(0), crop)["params"]
    return assemble(section, distances, weighting), params


def assemble(section: ml_collections.ConfigDict, distances: Mapping[str, Distance],
             weighting: Callable[[Array], Array] | None) -> PerceptualLoss:
    """The loss over the enabled terms, in `enabled_terms` order, with the section's crops and remat."""
    terms = tuple(Term(name, float(section[name].weight), distances[name]) for name in enabled_terms(section))
    return PerceptualLoss(terms, crop_size=int(section.crop_size), crop_scale=tuple(section.crop_scale),
                          crop_ratio=tuple(section.crop_ratio), weighting=weighting, remat=bool(section.remat))

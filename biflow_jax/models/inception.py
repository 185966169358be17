"""The FID Inception-v3 (TF graph ``inception-2015-12-05``) in Flax Linen, with FID/sFID/IS features.

FID (Heusel et al. 2017, arXiv:1706.08500), sFID (Nash et al. 2021, arXiv:2103.03841) and the
Inception Score (Salimans et al. 2016, arXiv:1606.03498) are defined on one particular network:
the 2015-12-05 TensorFlow Inception graph, which ADM's evaluator (Dhariwal & Nichol 2021,
arXiv:2105.05233) also runs. It is not torchvision's Inception-v3: its average pools ignore the
zero padding (``FIDInceptionA``/``C``/``E_1`` in pytorch-fid), the last block pools with a 3x3
max pool (``FIDInceptionE_2``), and the classifier has 1008 outputs. Module and parameter names
follow torchvision's ``Inception3`` (``Mixed_5b/branch1x1/conv``, ``.../bn``), so pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` converts by a flat rename
(``biflow_jax.interop.inception_weights``). BatchNorm runs in inference mode (eps 1e-3) from a
``batch_stats`` collection.

Input convention: the network takes NHWC float images already at 299x299 (any side >= 75 runs)
and already scaled to the network range, roughly [-1, 1]. ``preprocess_for_inception`` gets there
from uint8-range [0, 255] images in one of two conventions:

* ``"adm"`` (default): what the TF graph does to ADM's [0, 255] input. Its ``ResizeBilinear``
  node is TF1's legacy resize (``align_corners=False``, no half-pixel centres: output pixel i
  samples input coordinate ``i * in / out``), followed by ``(x - 128) / 128``.
* ``"pytorch_fid"``: ``F.interpolate(bilinear, align_corners=False)`` (half-pixel centres, no
  antialiasing) of [0, 1] images, then ``2x - 1``; i.e. ``x / 127.5 - 1`` on [0, 255].

Measured on uniform-noise uint8 images (max |diff| on the 0..255 scale, float32 on CPU):
``jax.image.resize(method="bilinear")`` equals torch's bilinear when upsampling (3e-5 for 64 or
256 -> 299) but antialiases when downsampling (133 for 512 -> 299, 144 for 1024 -> 299; 3e-5
again with ``antialias=False``), so it is not used here. Our ``"pytorch_fid"`` resize is within
5e-5 of torch and our ``"adm"`` resize equals ``tf.raw_ops.ResizeBilinear`` bit for bit. The two
conventions are half a source pixel apart: 143 max / 33 mean for 64 -> 299, 32 max / 7 mean
for 256 -> 299 on noise (much less on natural images), so features, and FID against ADM's
reference statistics, depend on the choice.

Outputs (``InceptionFeatures``): ``pool`` (N, 2048) is ``pool_3``; ``logits`` (N, 1008) is the
classifier with its bias (torch's ``fc``); ``is_logits`` is ``pool @ W`` without the bias, which
is what ADM's evaluator and Salimans et al.'s released IS code feed the softmax; ``spatial`` is
ADM's sFID feature, ``mixed_6/conv:0[..., :7]`` flattened in (H, W, C) order. In the TF graph
``mixed``, ``mixed_1`` .. ``mixed_10`` are Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c
(the block types and channel counts line up one to one), so ``mixed_6`` is Mixed_6d, and the
scope's unsuffixed ``conv`` op is the ReLU after ``conv/Conv2D`` and ``conv/batchnorm`` of its
first (1x1) branch: the tap is the output of ``Mixed_6d.branch1x1`` (N, 17, 17, 192 at 299 px),
of which the first 7 channels give 17 * 17 * 7 = 2023 features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

INCEPTION_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
Convention = Literal["adm", "pytorch_fid"]


@flax.struct.dataclass
class InceptionFeatures:
    """What FID, sFID, IS and precision/recall need from one batch of images."""

    pool: jax.Array  # (N, 2048) pool_3
    logits: jax.Array  # (N, 1008) fc with bias
    is_logits: jax.Array  # (N, 1008) pool @ fc kernel, no bias (ADM / Salimans IS)
    spatial: jax.Array  # (N, H*W*7) Mixed_6d.branch1x1[..., :7], (H, W, C) order


def _bilinear_taps(in_size: int, out_size: int, convention: Convention) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: lower and upper source index and the weight of the upper one."""
    scale = np.float32(in_size) / np.float32(out_size)
    out = np.arange(out_size, dtype=np.float32)
    if convention == "adm":  # TF1 ResizeBilinear, half_pixel_centers=False
        src = out * scale
    elif convention == "pytorch_fid":  # torch bilinear, align_corners=False (clamped at 0)
        # torch's CPU kernel rounds scale * (i + 0.5) - 0.5 once (a fused multiply-add), not per operation
        src = np.maximum(scale.astype(np.float64) * (out + 0.5) - 0.5, 0.0).astype(np.float32)
    else:
        raise ValueError(f"unknown resize convention {convention!r}; expected 'adm' or 'pytorch_fid'")
    lower = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, (src - lower).astype(np.float32)


def _lerp_axis(x: jax.Array, axis: int, out_size: int, convention: Convention) -> jax.Array:
    lower, upper, frac = _bilinear_taps(x.shape[axis], out_size, convention)
    shape = [1] * x.ndim
    shape[axis] = out_size
    a, b = jnp.take(x, lower, axis=axis), jnp.take(x, upper, axis=axis)
    return a + (b - a) * jnp.asarray(frac).reshape(shape)


def resize_for_inception(images: jax.Array, size: int = INCEPTION_SIZE, convention: Convention = "adm") -> jax.Array:
    """Bilinear resize of NHWC images to size x size, as the chosen FID implementation does it.

    ``"adm"``: TF1 legacy ``ResizeBilinear`` (the TF graph's own resize). ``"pytorch_fid"``:
    ``F.interpolate(mode="bilinear", align_corners=False)``. Neither antialiases. Width is
    interpolated before height, as TF's kernel does. Identity when the size already matches.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {images.shape}")
    if images.shape[2] != size:
        images = _lerp_axis(images, 2, size, convention)
    if images.shape[1] != size:
        images = _lerp_axis(images, 1, size, convention)
    return images


def scale_for_inception(images: jax.Array, convention: Convention = "adm") -> jax.Array:
    """[0, 255] pixel values to the network range: (x - 128) / 128 (TF graph) or x / 127.5 - 1."""
    images = jnp.asarray(images, jnp.float32)
    if convention == "adm":
        return (images - 128.0) * (1.0 / 128.0)
    if convention == "pytorch_fid":
        return images / 127.5 - 1.0
    raise ValueError(f"unknown scaling convention {convention!r}; expected 'adm' or 'pytorch_fid'")


def preprocess_for_inception(images: jax.Array, convention: Convention = "adm") -> jax.Array:
    """uint8-range NHWC images (any size) to the 299x299 network input of ``InceptionV3``."""
    return scale_for_inception(resize_for_inception(images, convention=convention), convention)


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU: torchvision's BasicConv2d."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, (self.strides, self.strides), padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=self.precision, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3/1 average pool whose border windows average only the real pixels (TF 'SAME')."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b/c/d (pytorch-fid's FIDInceptionA)."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = lambda f, k, p=(0, 0), name=None: BasicConv(f, k, 1, p, self.precision, name=name)  # noqa: E731
        b1 = c(64, (1, 1), name="branch1x1")(x)
        b5 = c(48, (1, 1), name="branch5x5_1")(x)
        b5 = c(64, (5, 5), (2, 2), name="branch5x5_2")(b5)
        b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), (1, 1), name="branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), (1, 1), name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: the 35 -> 17 grid reduction."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv(384, (3, 3), 2, precision=self.precision, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), precision=self.precision, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), 1, (1, 1), self.precision, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), 2, precision=self.precision, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (FIDInceptionC); ``branch1x1`` of Mixed_6d is the sFID tap."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        c7 = self.channels_7x7
        c = lambda f, k, p=(0, 0), name=None: BasicConv(f, k, 1, p, self.precision, name=name)  # noqa: E731
        b1 = c(192, (1, 1), name="branch1x1")(x)
        b7 = c(c7, (1, 1), name="branch7x7_1")(x)
        b7 = c(c7, (1, 7), (0, 3), name="branch7x7_2")(b7)
        b7 = c(192, (7, 1), (3, 0), name="branch7x7_3")(b7)
        bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), (3, 0), name="branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), (0, 3), name="branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), (3, 0), name="branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), (0, 3), name="branch7x7dbl_5")(bd)
        bp = c(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    """Mixed_7a: the 17 -> 8 grid reduction."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = lambda f, k, s=1, p=(0, 0), name=None: BasicConv(f, k, s, p, self.precision, name=name)  # noqa: E731
        b3 = c(192, (1, 1), name="branch3x3_1")(x)
        b3 = c(320, (3, 3), 2, name="branch3x3_2")(b3)
        b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), 1, (0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), 1, (3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), 2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (FIDInceptionE_1: padding-excluding avg pool) and 7c (FIDInceptionE_2: max pool)."""

    max_pool: bool
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = lambda f, k, p=(0, 0), name=None: BasicConv(f, k, 1, p, self.precision, name=name)  # noqa: E731
        b1 = c(320, (1, 1), name="branch1x1")(x)
        b3 = c(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([c(384, (1, 3), (0, 1), name="branch3x3_2a")(b3),
                              c(384, (3, 1), (1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(384, (3, 3), (1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([c(384, (1, 3), (0, 1), name="branch3x3dbl_3a")(bd),
                              c(384, (3, 1), (1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = c(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 on network-range NHWC input (see ``preprocess_for_inception``).

    ``precision`` defaults to HIGHEST so that accelerators do not silently use TF32/bf16
    passes in the convolutions: FID compares against statistics computed in float32.
    """

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> InceptionFeatures:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB input, got shape {x.shape}")
        if min(x.shape[1:3]) < 75:
            raise ValueError(f"Inception-v3 needs images of at least 75x75, got {x.shape[1:3]}")
        p = self.precision
        x = BasicConv(32, (3, 3), 2, precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), 1, (1, 1), p, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, p, name=name)(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        spatial = None
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x, branch1x1 = InceptionC(c7, p, name=name)(x)
            if name == "Mixed_6d":  # TF mixed_6/conv
                spatial = branch1x1[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(NUM_CLASSES, precision=p, name="fc")
        logits = fc(pool)
        is_logits = jnp.dot(pool, fc.variables["params"]["kernel"], precision=p)
        return InceptionFeatures(pool=pool, logits=logits, is_logits=is_logits, spatial=spatial)


def parameter_shapes() -> dict[str, dict[str, Sequence[int]]]:
    """{'params' | 'batch_stats': {'a/b/c': shape}} of InceptionV3, without allocating weights."""
    shapes = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3), jnp.float32))
    return {col: {"/".join(k): tuple(v.shape) for k, v in flatten_dict(tree).items()}
            for col, tree in shapes.items()}

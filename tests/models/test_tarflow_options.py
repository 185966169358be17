"""The improved-flow options (2D RoPE, RMSNorm, QK-norm, SwiGLU, per-block layer counts, and STARFlow's
gated MLP and clip of the shift): each against
a naive formula, and the whole flow with each of them (and all together) against float64 autodiff
(log-det), its naive inverse, Jacobi, guidance, denoising, classification and the nn.scan layout.

Tiny flows: 8x8x1 images, patch 2 (a 4x4 grid of 16 tokens of 4 dims), width 32, heads of 16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biflow_jax.architecture import FLOW_ROPE, swiglu_hidden
from biflow_jax.errors import ConfigError
from biflow_jax.evaluators import classify
from biflow_jax.models import registry
from biflow_jax.models.layers import GatedMLP, apply_rope, rope_tables
from biflow_jax.models.param_trees import stack_layer_params
from biflow_jax.models.tarflow import TARFlow
from biflow_jax.samplers import exact_inverse

BASE = dict(name="tarflow", img_size=8, in_channels=1, patch_size=2, channels=32, num_blocks=2,
            layers_per_block=1, num_classes=10, head_dim=16, expansion=2, clip=0.0, dtype="float32")
OPTIONS = {
    "rope": dict(rope=True),
    "rmsnorm": dict(norm="rmsnorm"),
    "qk_norm": dict(qk_norm=True),
    "swiglu": dict(mlp="swiglu"),
    "deep_shallow": dict(block_layers=(1, 3)),
    "starflow": dict(mlp="geglu_starflow", clip=0.05, clip_shift=True),  # STARFlow's MLP and clip
    "all": dict(rope=True, norm="rmsnorm", qk_norm=True, mlp="swiglu", block_layers=(2, 1)),
}


def random_leaf(path: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Every parameter away from its init (proj_out starts at zero, norm scales at one)."""
    if path.endswith("scale"):
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if path.endswith("proj_out/kernel"):
        return 0.03 * rng.standard_normal(shape)
    if path.endswith("kernel"):
        return rng.standard_normal(shape) / np.sqrt(shape[0])
    return 0.05 * rng.standard_normal(shape)  # biases, embeddings


def make(options: dict, dtype: str = "float32", seed: int = 0, **extra):
    """A flow and random params drawn in numpy (running model.init costs seconds on CPU)."""
    model = registry.build_flow({**BASE, **options, "dtype": dtype, **extra})
    float_dtype = jnp.float64 if dtype == "float64" else jnp.float32
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1), float_dtype),
                            jnp.zeros((1,), jnp.int32))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(random_leaf("/".join(k.key for k in path), leaf.shape, rng), float_dtype),
        shapes)
    return model, params


def batch(n: int = 3, dtype=jnp.float32):
    x = jax.random.uniform(jax.random.key(7), (n, 8, 8, 1), dtype, -1.0, 1.0)
    z = jax.random.normal(jax.random.key(8), (n, 16, 4), dtype)
    return x, z, jnp.array([0, 4, -1, 9][:n], jnp.int32)


def naive_rope(x: np.ndarray, row: int, col: int, base: float = 10000.0) -> np.ndarray:
    """2D axial RoPE of one head vector, pair by pair in float64: (r1[i], r2[i]) turn by row * f_i,
    (c1[i], c2[i]) by col * f_i, f_i = base^(-i / (d / 4))."""
    d = x.shape[-1]
    q = d // 4
    out = np.empty(d)
    for i in range(q):
        f = base ** (-i / q)
        for offset, pos in ((0, row), (2 * q, col)):
            a, b = x[offset + i], x[offset + q + i]
            c, s = np.cos(pos * f), np.sin(pos * f)
            out[offset + i], out[offset + q + i] = a * c - b * s, b * c + a * s
    return out


def test_rope_matches_pairwise_rotation_and_flipped_order():
    grid, d = 3, 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, grid * grid, 1, d))
    with jax.enable_x64(True):
        for flip in (False, True):
            cos, sin = rope_tables(grid, d, **FLOW_ROPE, flip=flip, dtype=jnp.float64)
            ours = np.asarray(apply_rope(jnp.asarray(x), cos, sin, FLOW_ROPE["pairing"]))[0, :, 0]
            for j in range(grid * grid):
                t = grid * grid - 1 - j if flip else j  # a flipped block's token j is raster token T-1-j
                np.testing.assert_allclose(ours[j], naive_rope(x[0, j, 0], t // grid, t % grid), atol=1e-12)


def test_rope_logits_depend_only_on_the_2d_offset():
    grid, d = 4, 16
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal(d), rng.standard_normal(d)
    with jax.enable_x64(True):
        cos, sin = rope_tables(grid, d, **FLOW_ROPE, dtype=jnp.float64)
        both = jnp.asarray(np.stack([np.tile(q, (grid * grid, 1)), np.tile(k, (grid * grid, 1))])[:, :, None])
        rq, rk = np.asarray(apply_rope(both, cos, sin, FLOW_ROPE["pairing"]))[:, :, 0]

    def logit(a, b):  # q at raster token a, k at raster token b
        return float(rq[a] @ rk[b])

    # (row, col) offset (1, 2) from two different places; and a different offset for contrast.
    np.testing.assert_allclose(logit(0 * grid + 0, 1 * grid + 2), logit(2 * grid + 1, 3 * grid + 3), atol=1e-12)
    assert abs(logit(0, 1 * grid + 2) - logit(0, 2 * grid + 1)) > 1e-3


def test_swiglu_and_rmsnorm_follow_their_formulas():
    _, params = make({"mlp": "swiglu", "norm": "rmsnorm"})
    layer = params["params"]["blocks_0"]["attn_blocks_0"]["mlp"]
    hidden = swiglu_hidden(32, 2)
    assert hidden == 48 and layer["gate_up"]["kernel"].shape == (32, 2 * hidden)
    assert set(layer["norm"]) == {"scale"}  # RMSNorm: no bias
    x = np.random.default_rng(2).standard_normal((2, 5, 32)).astype(np.float64)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), layer)
    h = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-5) * p["norm"]["scale"]
    gu = h @ p["gate_up"]["kernel"] + p["gate_up"]["bias"]
    gate, up = gu[..., :hidden], gu[..., hidden:]
    expected = (gate / (1 + np.exp(-gate)) * up) @ p["down"]["kernel"] + p["down"]["bias"]
    got = GatedMLP(32, hidden, jnp.float32, norm_kind="rmsnorm").apply({"params": layer}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)


def test_starflow_gated_mlp_follows_its_formula():
    """STARFlow's gated MLP (ml-starflow `MLP(use_swiglu=True)`): down(gelu_tanh(gate) * up), hidden C * expansion."""
    _, params = make({"mlp": "geglu_starflow"})
    layer = params["params"]["blocks_0"]["attn_blocks_0"]["mlp"]
    assert set(layer) == {"norm", "gate_proj", "up_proj", "down_proj"}
    assert layer["gate_proj"]["kernel"].shape == (32, 64)
    x = np.random.default_rng(3).standard_normal((2, 5, 32))
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), layer)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    h = (x - mu) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
    gate = h @ p["gate_proj"]["kernel"] + p["gate_proj"]["bias"]
    up = h @ p["up_proj"]["kernel"] + p["up_proj"]["bias"]
    gelu_tanh = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
    expected = (gelu_tanh * up) @ p["down_proj"]["kernel"] + p["down_proj"]["bias"]
    starflow = GatedMLP(32, 64, gate="gelu_tanh", fused=False, norm_kind="layernorm")
    got = starflow.apply({"params": layer}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)
    erf_gelu = 0.5 * gate * (1 + np.vectorize(math.erf)(gate / np.sqrt(2)))
    assert np.abs((erf_gelu * up) @ p["down_proj"]["kernel"] + p["down_proj"]["bias"] - expected).max() > 1e-4


def test_clip_shift_clips_the_shift_as_well_as_the_log_scale():
    """clip_shift: b = c tanh(b_raw / c) (STARFlow clips all of proj_out's output); a is clipped either way."""
    clip = 0.05
    model, params = make({"clip": clip, "clip_shift": True})
    x, _, y = batch()
    transform = jax.jit(lambda p, tokens, y: model.apply(p, 0, tokens, y, method=TARFlow.block_transform))
    a, b, hiddens = transform(params, jnp.reshape(x, (3, 16, 4)), y)
    proj = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), params["params"]["blocks_0"]["proj_out"])
    raw = np.asarray(hiddens[-1], np.float64) @ proj["kernel"] + proj["bias"]  # proj_out, unclipped
    raw = np.concatenate([np.zeros_like(raw[:, :1]), raw[:, :-1]], axis=1)  # token t sees x[<t]
    a_raw, b_raw = raw[..., :4], raw[..., 4:]
    assert np.abs(b_raw).max() > 2 * clip and np.abs(a_raw).max() > 2 * clip  # the clip bites
    np.testing.assert_allclose(b, clip * np.tanh(b_raw / clip), atol=1e-6)
    np.testing.assert_allclose(a, clip * np.tanh(a_raw / clip), atol=1e-6)


def test_option_trees():
    """RoPE drops the learned positions; QK-norm adds (head_dim,) norms; block_layers sets each depth."""
    _, params = make(OPTIONS["all"])
    p = params["params"]
    assert "pos_embed" not in p["blocks_0"]
    assert sorted(k for k in p["blocks_0"] if k.startswith("attn_blocks")) == ["attn_blocks_0", "attn_blocks_1"]
    assert sorted(k for k in p["blocks_1"] if k.startswith("attn_blocks")) == ["attn_blocks_0"]
    attention = p["blocks_0"]["attn_blocks_0"]["attention"]
    assert attention["q_norm"]["scale"].shape == (16,) and attention["k_norm"]["scale"].shape == (16,)
    _, default = make({})
    assert "pos_embed" in default["params"]["blocks_0"]
    assert "q_norm" not in default["params"]["blocks_0"]["attn_blocks_0"]["attention"]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_logdet_equals_float64_jacobian(name):
    with jax.enable_x64(True):
        model, params = make(OPTIONS[name], dtype="float64")
        x, _, y = batch(1, jnp.float64)

        def flat_forward(v):
            return model.apply(params, v.reshape(x.shape), y).z.reshape(-1)

        jac = jax.jit(jax.jacfwd(flat_forward))(x.reshape(-1))
        _, logabsdet = jnp.linalg.slogdet(jac)
        ours = float(jnp.sum(jax.jit(model.apply)(params, x, y).logdets)) * x.size
        assert jac.dtype == jnp.float64 and abs(float(logabsdet)) > 1e-2
        np.testing.assert_allclose(ours, float(logabsdet), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_cached_inverse_equals_naive_and_round_trips(name):
    model, params = make(OPTIONS[name])
    x, z, y = batch()
    cached = exact_inverse.inverse_cached(model, params, z, y)
    naive = exact_inverse.inverse_naive(model, params, z, y)
    np.testing.assert_allclose(cached, naive, atol=1e-5)
    assert float(jnp.max(jnp.abs(cached - z))) > 1e-2  # the flow does something
    encoded = exact_inverse.encode(model, params, x, y)
    back = exact_inverse.tokens_to_images(model, exact_inverse.inverse_cached(model, params, encoded, y))
    np.testing.assert_allclose(back, x, atol=1e-4)


def test_all_options_guidance_jacobi_denoise_classify_and_scan():
    model, params = make(OPTIONS["all"])
    x, z, y = batch()
    guidance = exact_inverse.Guidance(scale=1.5, what="ab", annealed=True, attn_temp=0.7, rule="cfg")
    guided = exact_inverse.inverse_cached(model, params, z, y, guidance)
    np.testing.assert_allclose(guided, exact_inverse.inverse_naive(model, params, z, y, guidance), atol=1e-5)
    assert float(jnp.max(jnp.abs(guided - exact_inverse.inverse_cached(model, params, z, y)))) > 1e-3
    jacobi, _ = exact_inverse.inverse_jacobi(model, params, z, y, guidance, tol=0.0)
    np.testing.assert_allclose(jacobi, guided, atol=1e-5)
    denoised = exact_inverse.denoise(model, params, x * 0.5, y, 0.2)
    assert denoised.shape == x.shape and bool(jnp.all(jnp.isfinite(denoised)))
    assert float(jnp.max(jnp.abs(denoised - x * 0.5))) > 1e-4
    scores = classify.class_scores(model, params, x)
    assert scores.shape == (3, 10) and bool(jnp.all(jnp.isfinite(scores)))
    assert classify.probe_locations(model) == ((1, 1), (1, 2), (2, 1))
    # nn.scan over each block's layers (2 and 1 here) gives the same flow from stacked params.
    scanned = registry.build_flow({**BASE, **OPTIONS["all"], "scan_layers": True})
    out, out_scan = model.apply(params, x, y), scanned.apply(stack_layer_params(params), x, y)
    np.testing.assert_allclose(out_scan.z, out.z, atol=1e-5)
    np.testing.assert_allclose(exact_inverse.inverse_cached(scanned, stack_layer_params(params), z, y),
                               exact_inverse.inverse_cached(model, params, z, y), atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(norm="batchnorm"), "model.norm"),
    (dict(mlp="relu"), "model.mlp"),
    (dict(rope=True, head_dim=18, channels=36), "head_dim divisible by 4"),
    (dict(block_layers=(1, 2, 3)), "model.block_layers"),
])
def test_bad_option_values_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        registry.build_flow({**BASE, **bad})

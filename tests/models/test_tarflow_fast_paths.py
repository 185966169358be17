"""The flow's fast paths compute the same function as the plain ones.

nn.scan over layers (and the stacked <-> per-layer params conversion), rematerialisation,
the exact-GELU formula, head-major attention, prefix-segment cached decoding and bfloat16
KV caches. Tiny flows (8x8x1, patch 2: 16 tokens; width 32, two 16-d heads): compile
time dominates on CPU. No timing here, only agreement.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biflow_jax.interop.tarflow_layout import flow_params_to_state_dict
from biflow_jax.models import attention, layers, tarflow
from biflow_jax.models.param_trees import stack_layer_params, unstack_layer_params
from biflow_jax.models.tarflow import TARFlow, build_flow
from biflow_jax.samplers import exact_inverse

CFG = dict(img_size=8, in_channels=1, patch_size=2, channels=32, num_blocks=2, layers_per_block=2,
           num_classes=3, head_dim=16, expansion=4, clip=0.0, dtype="float32")


def _perturbed(params, rng, scale=0.05):
    """proj_out kernels away from zero, so (a, b) depend on the context."""
    def fix(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return scale * jax.random.normal(jax.random.fold_in(rng, hash(name) % 1000), leaf.shape) \
            if name.endswith("proj_out/kernel") else leaf

    return jax.tree_util.tree_map_with_path(fix, params)


@pytest.fixture(scope="module")
def setup():
    model = build_flow(CFG)
    x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1), minval=-1.0, maxval=1.0)
    y = jnp.array([0, 2, -1], jnp.int32)
    params = _perturbed(model.init(jax.random.key(1), x, y), jax.random.key(2))
    return model, params, x, y


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree_util.tree_leaves(a),
                                                               jax.tree_util.tree_leaves(b)))


def test_defaults_keep_the_per_layer_tree(setup):
    model, params, _, _ = setup
    assert not model.scan_layers and model.remat == "none"
    assert {"attn_blocks_0", "attn_blocks_1"} <= set(params["params"]["blocks_0"])


def test_stack_unstack_round_trip_and_export(setup):
    model, params, x, y = setup
    scanned = build_flow({**CFG, "scan_layers": True})
    stacked = stack_layer_params(params)
    expected = jax.eval_shape(scanned.init, jax.random.key(1), x, y)
    assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(expected)
    assert jax.tree_util.tree_map(jnp.shape, stacked) == jax.tree_util.tree_map(lambda s: s.shape, expected)
    back = unstack_layer_params(stacked)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    assert _max_diff(back, params) == 0.0
    export = flow_params_to_state_dict(params, CFG)
    export_scanned = flow_params_to_state_dict(unstack_layer_params(stacked), CFG)
    assert export.keys() == export_scanned.keys()
    assert all(np.array_equal(export[k], export_scanned[k]) for k in export)


def test_scan_matches_unrolled(setup):
    model, params, x, y = setup
    scanned = build_flow({**CFG, "scan_layers": True})
    out, out_scan = model.apply(params, x, y), scanned.apply(stack_layer_params(params), x, y)
    assert _max_diff(out.z, out_scan.z) <= 1e-6
    assert _max_diff(out.logdets, out_scan.logdets) <= 1e-6
    assert _max_diff(out.trajectory, out_scan.trajectory) <= 1e-6
    assert [len(h) for h in out.hiddens] == [len(h) for h in out_scan.hiddens]
    assert _max_diff(out.hiddens, out_scan.hiddens) <= 1e-6

    def grads(m, p):
        return jax.grad(lambda q: jnp.mean(m.apply(q, x, y).z ** 2) - jnp.mean(m.apply(q, x, y).logdets))(p)

    assert _max_diff(grads(model, params), unstack_layer_params(grads(scanned, stack_layer_params(params)))) <= 1e-5


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_tree_and_gradients(setup, remat):
    model, params, x, y = setup
    rematted = build_flow({**CFG, "remat": remat})

    def loss(m, p):
        out = m.apply(p, x, y)
        return jnp.mean(out.z ** 2) - jnp.mean(out.logdets)

    assert jax.tree_util.tree_structure(jax.eval_shape(rematted.init, jax.random.key(1), x, y)) == \
        jax.tree_util.tree_structure(params)
    assert _max_diff(jax.grad(lambda p: loss(model, p))(params), jax.grad(lambda p: loss(rematted, p))(params)) <= 1e-6


def test_remat_rejects_unknown_policy():
    with pytest.raises(ValueError, match="model.remat"):
        build_flow({**CFG, "remat": "sometimes"})


def test_gelu_formula_is_exact_gelu():
    x = jnp.linspace(-12.0, 12.0, 4001)
    np.testing.assert_allclose(layers.gelu_exact(x), jax.nn.gelu(x, approximate=False), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda v: layers.gelu_exact(v).sum())(x),
                               jax.grad(lambda v: jax.nn.gelu(v, approximate=False).sum())(x), atol=1e-6)


@pytest.mark.parametrize("tokens", [5, 16])  # 5: one tile; 16: 4 query tiles of 4 (masked blocks skipped)
def test_head_major_attention_matches_reference_formula(tokens):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, tokens, 3, 4)) for i in range(3))
    temp = jnp.array([1.0, 0.7])
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / 2.0 / temp[:, None, None, None]
    logits = jnp.where(jnp.tril(jnp.ones((tokens, tokens), bool)), logits, -jnp.inf)
    expected = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, -1), v)
    np.testing.assert_allclose(attention.attention(q, k, v, temp, jnp.float32), expected, atol=1e-6)
    # Gradients too: the tiles must route every query's and key's gradient.
    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    def reference(q, k, v):
        lg = jnp.einsum("nqhd,nkhd->nhqk", q, k) / 2.0
        lg = jnp.where(jnp.tril(jnp.ones((tokens, tokens), bool)), lg, -jnp.inf)
        return jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(lg, -1), v)

    ours = jax.grad(loss, argnums=(1, 2, 3))(lambda *a: attention.attention(*a, 1.0, jnp.float32), q, k, v)
    ref = jax.grad(loss, argnums=(1, 2, 3))(reference, q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_prefix_segments_cover_every_step():
    for steps in (1, 2, 15, 255):
        for segments in (0, 1, 3, 8, 400):
            parts = exact_inverse.prefix_segments(steps, segments)
            assert parts[0][0] == 0 and parts[-1][1] == steps
            assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
    assert len(exact_inverse.prefix_segments(255)) == 8


@pytest.mark.parametrize("guided", [False, True])
def test_prefix_segment_decode_matches_full_decode(setup, guided):
    model, params, x, y = setup
    guidance = exact_inverse.Guidance(scale=1.5) if guided else exact_inverse.NO_GUIDANCE
    z = model.apply(params, x, y).z
    full = exact_inverse.inverse_cached(model, params, z, y, guidance, segments=1)
    for segments in (3, 15):
        np.testing.assert_allclose(exact_inverse.inverse_cached(model, params, z, y, guidance, segments=segments),
                                   full, atol=1e-5, rtol=0)
    np.testing.assert_allclose(full, exact_inverse.inverse_naive(model, params, z, y, guidance), atol=1e-5, rtol=0)
    if not guided:
        np.testing.assert_allclose(full, tarflow.patchify(x, 2), atol=1e-5, rtol=0)


def test_scan_decode_matches_unrolled_decode(setup):
    model, params, x, y = setup
    scanned = build_flow({**CFG, "scan_layers": True})
    z = model.apply(params, x, y).z
    guidance = exact_inverse.Guidance(scale=1.5)
    np.testing.assert_allclose(exact_inverse.inverse_cached(scanned, stack_layer_params(params), z, y, guidance),
                               exact_inverse.inverse_cached(model, params, z, y, guidance), atol=1e-5, rtol=0)


def test_bfloat16_cache_and_model_sample_close_to_float32(setup):
    model, params, x, y = setup
    z = model.apply(params, x, y).z
    exact = exact_inverse.inverse_cached(model, params, z, y)
    bf16_cache = exact_inverse.inverse_cached(model, params, z, y, cache_dtype="bfloat16")
    assert bf16_cache.dtype == jnp.float32
    np.testing.assert_allclose(bf16_cache, exact, atol=2e-2, rtol=0)
    assert float(jnp.max(jnp.abs(bf16_cache - exact))) > 0  # the cache really was bfloat16
    bf16_model = TARFlow(**{**{k: v for k, v in CFG.items() if k != "dtype"}, "dtype": jnp.bfloat16})
    np.testing.assert_allclose(exact_inverse.inverse_cached(bf16_model, params, z, y), exact, atol=5e-2, rtol=0)


def test_state_dict_imports_into_the_scan_layout(setup):
    from biflow_jax.interop.tarflow_layout import state_dict_to_flow_params

    _, params, _, _ = setup
    state_dict = flow_params_to_state_dict(stack_layer_params(params), CFG)  # a scanned tree exports too
    assert state_dict.keys() == flow_params_to_state_dict(params, CFG).keys()
    imported = state_dict_to_flow_params(state_dict, {**CFG, "scan_layers": True})
    expected = stack_layer_params(params)
    assert jax.tree_util.tree_structure(imported) == jax.tree_util.tree_structure(expected)
    assert _max_diff(imported, expected) == 0.0

"""BiFlow reverse model G, its stage-2 objective, and the editing functions.

Tiny sizes throughout: 16 tokens of 4 dims (8x8x1 images, patch 2), width 64, 2 heads,
depth 3, B = 2 forward blocks -> 3 stages of one layer. Compilation dominates on CPU,
so every model call goes through one jitted `apply` with a fixed signature
(labels (N,), w (N,)) wherever possible.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.params import perturbed

from biflow_jax.models.reverse import ReverseViT
from biflow_jax.models.tarflow import TARFlow
from biflow_jax.objectives import biflow as obj
from biflow_jax.samplers import one_nfe

T, D, B, K, N = 16, 4, 2, 10, 3


def w_of(value):
    return jnp.full((N,), value, jnp.float32)


@pytest.fixture(scope="module")
def model():
    return ReverseViT(num_tokens=T, token_dim=D, num_forward_blocks=B, depth=3, width=64, heads=2, mlp_ratio=4.0,
                      num_classes=K)


@pytest.fixture(scope="module")
def z():
    return jax.random.normal(jax.random.key(0), (N, T, D))


@pytest.fixture(scope="module")
def labels():
    return jnp.array([1, -1, 9])


@pytest.fixture(scope="module")
def params(model, z, labels):
    return jax.jit(model.init)(jax.random.key(1), z, labels, w_of(0.0))


@pytest.fixture(scope="module")
def apply(model):
    return jax.jit(model.apply)


@pytest.fixture(scope="module")
def teeth(params):
    return perturbed(params, 0.1)


def test_output_shapes_and_stage_split(model, params, apply, z, labels):
    out = apply(params, z, labels, w_of(0.0))
    assert model.num_stages == B + 1 and model.stage_sizes == (1, 1, 1)
    assert len(out.stage_outputs) == B + 1 and len(out.hiddens) == B + 1
    assert all(s.shape == (N, T, D) and s.dtype == jnp.float32 for s in out.stage_outputs)
    assert all(h.shape == (N, T, 64) for h in out.hiddens)
    np.testing.assert_array_equal(out.image_tokens, out.stage_outputs[-1])
    assert ReverseViT(T, D, B, depth=4, width=64, heads=2).stage_sizes == (2, 1, 1)
    assert ReverseViT(T, D, B, depth=4, width=64, heads=2, layers_per_stage=(1, 1, 2)).stage_sizes == (1, 1, 2)
    with pytest.raises(ValueError, match="layers_per_stage"):
        _ = ReverseViT(T, D, B, depth=4, width=64, heads=2, layers_per_stage=(2, 2)).stage_sizes
    with pytest.raises(ValueError, match="every stage needs a layer"):
        _ = ReverseViT(T, D, B, depth=2, width=64, heads=2).stage_sizes


def test_bottleneck_variant_routes_through_token_space(teeth, z, labels):
    model = ReverseViT(T, D, B, depth=3, width=64, heads=2, num_classes=K, stage_bottleneck=True)
    shapes = jax.eval_shape(model.init, jax.random.key(2), z, labels, w_of(0.0))
    extra = set(shapes["params"]) - set(teeth["params"])
    assert extra == {"reembed_0", "reembed_1"}
    # Reuse the plain model's weights; only the re-embedding layers are new.
    params = {"params": dict(teeth["params"], **perturbed({k: shapes["params"][k] for k in extra}, 1.0, seed=3))}
    apply = jax.jit(model.apply)
    out = apply(params, z, labels, w_of(0.0))
    assert [s.shape for s in out.stage_outputs] == [(N, T, D)] * 3
    # The stage-1 hidden sees z only through the stage-0 output: changing that head alters it.
    bumped = jax.tree_util.tree_map(lambda a: a, params)
    bumped["params"]["heads_0"]["proj"]["bias"] = bumped["params"]["heads_0"]["proj"]["bias"] + 1.0
    bumped_out = apply(bumped, z, labels, w_of(0.0))
    np.testing.assert_array_equal(bumped_out.hiddens[0], out.hiddens[0])
    assert np.max(np.abs(bumped_out.hiddens[1] - out.hiddens[1])) > 1e-3


def test_attention_is_non_causal(apply, teeth, z, labels):
    base = apply(teeth, z, labels, w_of(0.0))
    last = apply(teeth, z.at[:, -1].add(1.0), labels, w_of(0.0))
    first = apply(teeth, z.at[:, 0].add(1.0), labels, w_of(0.0))
    for k in range(B + 1):
        # Token 0 reacts to the last token and the last token to token 0: no causal mask.
        assert np.max(np.abs(last.stage_outputs[k][:, 0] - base.stage_outputs[k][:, 0])) > 1e-4
        assert np.max(np.abs(first.stage_outputs[k][:, -1] - base.stage_outputs[k][:, -1])) > 1e-4


def test_adaln_zero_blocks_start_as_identity(model, apply, params, z, labels):
    # Every stage here is one block, so "the hidden state after stage k equals the
    # embedded input" says each block's output equals its input (exactly: gates are 0).
    embedded = model.apply(params, z, method=lambda m, tokens: m.embed(tokens) + m.positions())
    res = apply(params, z, labels, w_of(1.5))
    assert model.stage_sizes == (1, 1, 1)
    for hidden in res.hiddens:
        np.testing.assert_array_equal(hidden, embedded)
    # The zero-initialised heads output exactly 0.
    for s in res.stage_outputs:
        np.testing.assert_array_equal(s, 0.0)


def test_label_mapping_uses_null_token(model, params, teeth, apply, z, labels):
    idx = model.apply(params, jnp.array([-1, 0, K - 1, -5, K]), 5, method=ReverseViT.label_index)
    np.testing.assert_array_equal(idx, [K, 0, K - 1, K, K])
    np.testing.assert_array_equal(model.apply(params, None, 2, method=ReverseViT.label_index), [K, K])
    table = params["params"]["class_embed"]["embedding"]
    assert table.shape == (K + 1, 64)
    # Without guidance embedding in the way, the condition of a dropped label is the null row.
    plain = ReverseViT(T, D, B, depth=3, width=64, heads=2, num_classes=K, guidance_conditioning=False)
    cond = plain.apply({"params": {"class_embed": params["params"]["class_embed"]}}, jnp.array([-1, 3]), None, 2,
                       method=ReverseViT.condition)
    np.testing.assert_array_equal(cond, table[jnp.array([K, 3])])
    # In the full model a dropped label and y=None give the same output; a real label differs.
    dropped = apply(teeth, z, jnp.full((N,), -1), w_of(0.0)).image_tokens
    none = model.apply(teeth, None, w_of(0.0), N, method=ReverseViT.condition)
    np.testing.assert_array_equal(model.apply(teeth, jnp.full((N,), -1), w_of(0.0), N, method=ReverseViT.condition),
                                  none)
    other = apply(teeth, z, jnp.full((N,), 3), w_of(0.0)).image_tokens
    assert np.max(np.abs(other - dropped)) > 1e-4


def test_guidance_embedding_changes_output(apply, teeth, z, labels):
    at0 = apply(teeth, z, labels, w_of(0.0)).image_tokens
    at2 = apply(teeth, z, labels, w_of(2.0)).image_tokens
    per_sample = apply(teeth, z, labels, jnp.array([0.0, 2.0, 0.0])).image_tokens
    assert np.max(np.abs(at2 - at0)) > 1e-3
    np.testing.assert_allclose(per_sample[0], at0[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(per_sample[1], at2[1], rtol=0, atol=1e-6)


def test_rms_normalize_gives_unit_rms():
    x = jax.random.normal(jax.random.key(6), (4, T, D)) * jnp.array([0.01, 1.0, 30.0, 5.0])[:, None, None]
    rms = jnp.sqrt(jnp.mean(obj.rms_normalize(x) ** 2, axis=(1, 2)))
    np.testing.assert_allclose(rms, 1.0, rtol=1e-4)
    np.testing.assert_allclose(obj.rms_normalize(7.0 * x), obj.rms_normalize(x), rtol=1e-4, atol=1e-6)


def test_adaptive_weight_passes_no_gradient_through_its_weight():
    d = jnp.array([0.0, 0.003, 0.5, 2.0, 40.0])
    for p, c in [(1.0, 0.01), (0.5, 0.1)]:
        grad = jax.grad(lambda v, p=p, c=c: jnp.sum(obj.adaptive_weight(v, p, c)))(d)
        np.testing.assert_allclose(grad, (d + c) ** -p, rtol=1e-6)
        np.testing.assert_allclose(obj.adaptive_weight(d, p, c), d * (d + c) ** -p, rtol=1e-6)


def test_cfg_combine_formula_and_gradient():
    cond = jax.random.normal(jax.random.key(8), (N, T, D))
    uncond = jax.random.normal(jax.random.key(9), (N, T, D))
    w = jnp.array([0.0, 1.0, 3.5])
    expected = (cond + w[:, None, None] * uncond) / (1 + w[:, None, None])
    np.testing.assert_allclose(obj.cfg_combine(cond, uncond, w), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(obj.cfg_combine(cond, uncond, 2.0), (cond + 2 * uncond) / 3, rtol=1e-6, atol=1e-6)
    g_cond, g_uncond = jax.grad(lambda a, b: jnp.sum(obj.cfg_combine(a, b, w)), argnums=(0, 1))(cond, uncond)
    np.testing.assert_array_equal(g_uncond, 0.0)
    np.testing.assert_allclose(g_cond, jnp.broadcast_to(1 / (1 + w[:, None, None]), cond.shape), rtol=1e-6)


def test_sample_guidance_scale_range_and_per_example():
    keys = jax.random.split(jax.random.key(10), 1000)
    w = obj.sample_guidance_scale(keys, 1.0, 3.0)
    assert w.shape == (1000,) and float(w.min()) >= 1.0 and float(w.max()) <= 3.0
    assert float(w.std()) > 0.3  # spread over the range, not a constant
    # Each example's w comes from its own key: a slice of the batch draws the same values.
    np.testing.assert_array_equal(obj.sample_guidance_scale(keys[100:200], 1.0, 3.0), w[100:200])


def test_guided_training_outputs_match_manual_combination(apply, teeth, z, labels):
    w = jnp.array([2.0, 2.0, 0.5])
    apply_fn = lambda zz, yy, ww: apply(teeth, zz, yy, ww)
    combined = obj.guided_training_outputs(apply_fn, z, labels, w)
    w_eff = jnp.array([2.0, 0.0, 0.5])  # the dropped label (index 1) trains without guidance
    cond = apply_fn(z, labels, w_eff).stage_outputs
    uncond = apply_fn(z, jnp.full((N,), -1), w_of(0.0)).stage_outputs
    for k in range(B + 1):
        np.testing.assert_allclose(combined[k], obj.cfg_combine(cond[k], uncond[k], w_eff), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(combined[-1][1], cond[-1][1], rtol=1e-5, atol=1e-6)


def test_losses_finite_and_every_term_decreases_under_adam(model, params, apply, z, labels):
    keys = jax.random.split(jax.random.key(12), B + 2)
    # A fixed random "trajectory" whose states have very different scales.
    trajectory = tuple(jax.random.normal(keys[i], (N, T, D)) * (3.0 ** i) for i in range(B + 1))
    clean = jnp.tanh(jax.random.normal(keys[-1], (N, T, D)))
    outputs = apply(perturbed(params, 0.02), z, labels, w_of(0.0)).stage_outputs
    for name, loss_fn in obj.OBJECTIVES.items():
        terms = loss_fn(outputs, trajectory, clean)
        assert all(bool(jnp.isfinite(v)) for v in terms.values()), name
        assert ("align/x0" in terms) == (name != "naive_distillation")
    opt = optax.adam(3e-3)

    def loss(p):
        terms = obj.hidden_alignment_loss(model.apply(p, z, labels, w_of(0.0)).stage_outputs, trajectory, clean)
        return terms["total"], terms

    @jax.jit
    def step(p, state):
        (_, terms), grads = jax.value_and_grad(loss, has_aux=True)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, terms

    p, state = params, opt.init(params)
    history = []
    for _ in range(21):  # terms are those before each update: 20 updates between first and last
        p, state, terms = step(p, state)
        history.append(terms)
    first, last = history[0], history[-1]
    assert set(first) == {"align/x0", "align/x1", "denoise", "total"}
    for key in ("align/x0", "align/x1", "denoise"):
        assert bool(jnp.isfinite(last[key])) and float(last[key]) < 0.9 * float(first[key]), key
    # Targets are normalised, so at the zero-output init every alignment term is 1.
    np.testing.assert_allclose(first["align/x1"], 1.0, rtol=1e-4)


def test_final_target_option(apply, params, z, labels):
    trajectory = tuple(jnp.full((N, T, D), float(i + 1)) for i in range(B + 1))
    out = apply(params, z, labels, w_of(0.0))  # zero outputs at init
    noised = obj.hidden_alignment_loss(out.stage_outputs, trajectory, final_target="noised", adaptive=False)
    np.testing.assert_allclose(noised["denoise"], 1.0, rtol=1e-6)  # x^0 = 1 everywhere, unnormalised
    clean = obj.hidden_alignment_loss(out.stage_outputs, trajectory, 0.5 * jnp.ones((N, T, D)), adaptive=False)
    np.testing.assert_allclose(clean["denoise"], 0.25, rtol=1e-6)
    distill = obj.hidden_distillation_loss(out.stage_outputs, trajectory, final_target="noised", adaptive=False)
    np.testing.assert_allclose(distill["align/x1"], 4.0, rtol=1e-6)  # unnormalised x^1 = 2
    with pytest.raises(ValueError, match="clean_tokens"):
        obj.hidden_alignment_loss(out.stage_outputs, trajectory)


TO_IMAGES = one_nfe.token_images(2, 8, 1)


def test_one_nfe_sample_with_per_stage_cfg(model, teeth, apply, z, labels):
    plain = TO_IMAGES(apply(teeth, z, labels, w_of(1.0)).image_tokens)
    unguided = one_nfe.one_nfe_sample(model, teeth, z, labels, w_of(1.0), to_images=TO_IMAGES, cfg_scale=w_of(0.0))
    assert unguided.shape == (N, 8, 8, 1)
    np.testing.assert_allclose(unguided, plain, rtol=0, atol=1e-5)  # scale 0: the conditional branch
    guided = one_nfe.one_nfe_sample(model, teeth, z, labels, w_of(1.0), to_images=TO_IMAGES, cfg_scale=w_of(2.0))
    assert np.max(np.abs(guided - plain)) > 1e-3


@pytest.fixture(scope="module")
def flow_pair(apply, teeth):
    """A random tiny TARFlow as F (its own init is tested elsewhere) and G through the shared `apply`."""
    flow = TARFlow(img_size=8, in_channels=1, patch_size=2, channels=32, num_blocks=B, layers_per_block=1,
                   num_classes=K, head_dim=16)
    x = jnp.tanh(jax.random.normal(jax.random.key(13), (N, 8, 8, 1)))
    shapes = jax.eval_shape(flow.init, jax.random.key(14), x, jnp.zeros((N,), jnp.int32))
    flow_params = perturbed(shapes, 0.05, seed=14)
    return x, one_nfe.flow_encoder(flow, flow_params), lambda z, y: apply(teeth, z, y, w_of(0.0)).image_tokens


def test_inpaint_keeps_known_noise_exactly(flow_pair, labels):
    x, forward_apply, reverse_apply = flow_pair
    mask = np.zeros((N, 8, 8), bool)
    mask[:, :, :4] = True  # left half known: token columns 0 and 1
    mask[:, 0, 4] = True  # one pixel of a patch that is otherwise unknown
    eps = jax.random.normal(jax.random.key(15), (N, T, D))
    res = one_nfe.inpaint(forward_apply, reverse_apply, x, mask, labels, jax.random.key(16), patch_size=2, eps=eps)
    known = np.asarray(res.token_mask[..., 0])
    expected = np.tile(np.arange(T) % 4 < 2, (N, 1))  # raster tokens on a 4x4 grid
    np.testing.assert_array_equal(known, expected)
    z_known = np.asarray(forward_apply(x, labels))
    z_prime = np.asarray(res.z_prime)
    np.testing.assert_array_equal(z_prime[known], z_known[known])  # bitwise
    np.testing.assert_array_equal(z_prime[~known], np.asarray(eps)[~known])  # bitwise
    assert res.images.shape == x.shape and bool(jnp.all(jnp.isfinite(res.images)))
    np.testing.assert_allclose(res.generated, TO_IMAGES(reverse_apply(res.z_prime, labels)), rtol=0, atol=1e-6)
    # The known pixels are the input's, bit for bit; the rest is G's output.
    pixels = np.broadcast_to(mask[..., None], x.shape)
    np.testing.assert_array_equal(np.asarray(res.images)[pixels], np.asarray(x)[pixels])
    np.testing.assert_array_equal(np.asarray(res.images)[~pixels], np.asarray(res.generated)[~pixels])


def test_class_edit_inverts_with_source_and_decodes_with_target(flow_pair, labels):
    x, forward_apply, reverse_apply = flow_pair
    target = jnp.array([4, 4, 4])
    images, z = one_nfe.class_edit(forward_apply, reverse_apply, x, labels, target, patch_size=2)
    np.testing.assert_array_equal(z, forward_apply(x, labels))
    np.testing.assert_allclose(images, TO_IMAGES(reverse_apply(z, target)), rtol=0, atol=1e-6)
    same = one_nfe.class_edit(forward_apply, reverse_apply, x, labels, labels, patch_size=2)[0]
    assert np.max(np.abs(images - same)) > 1e-4


def test_bound_models_compile_once_for_any_weights(model, teeth, params, z, labels):
    """reverse_decoder / flow_encoder (the editing modes' G and F) take the weights as arguments of one
    compiled program: a jitted closure would fold every weight into its executable as a constant and
    compile again for each checkpoint. A second weight set: a different answer, no new executable."""
    a = one_nfe.reverse_decoder(model, teeth, w_of(1.0))(z, labels)
    compiled = one_nfe._decode._cache_size()
    b = one_nfe.reverse_decoder(model, perturbed(params, 0.1, seed=3), w_of(1.0))(z, labels)
    assert one_nfe._decode._cache_size() == compiled
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    flow = TARFlow(img_size=8, in_channels=1, patch_size=2, channels=32, num_blocks=B, layers_per_block=1,
                   num_classes=K, head_dim=16)
    x = jnp.zeros((N, 8, 8, 1))
    shapes = jax.eval_shape(flow.init, jax.random.key(14), x, jnp.zeros((N,), jnp.int32))
    zs = [one_nfe.flow_encoder(flow, perturbed(shapes, 0.05, seed=1))(x, labels)]
    compiled = one_nfe._encode._cache_size()
    zs.append(one_nfe.flow_encoder(flow, perturbed(shapes, 0.05, seed=2))(x, labels))
    assert one_nfe._encode._cache_size() == compiled
    assert float(jnp.max(jnp.abs(zs[0] - zs[1]))) > 1e-3

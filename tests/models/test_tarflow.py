"""The forward flow: token order, exact per-block inverse, and log-det against float64 autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.params import perturbed
from jax import enable_x64

from biflow_jax.models.tarflow import TARFlow, patchify, unpatchify


def tiny_flow(dtype=jnp.float32, num_classes=10, clip=0.0, num_blocks=3):
    return TARFlow(img_size=4, in_channels=2, patch_size=2, channels=64, num_blocks=num_blocks,
                   layers_per_block=1, num_classes=num_classes, head_dim=32, clip=clip, dtype=dtype)


def randomized_params(model, seed=0, scale=0.05):
    """Init, then perturb every leaf (proj_out is zero at init, which would hide bugs)."""
    x = jnp.zeros((2, model.img_size, model.img_size, model.in_channels))
    params = model.init(jax.random.PRNGKey(seed), x, jnp.zeros((2,), jnp.int32) if model.num_classes else None)
    return perturbed(params, scale, seed=seed + 1)


def test_patchify_matches_torch_unfold():
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 4)).astype(np.float32)  # NCHW
    ref = torch.nn.functional.unfold(torch.from_numpy(x), 2, stride=2).transpose(1, 2).numpy()
    ours = np.asarray(patchify(jnp.asarray(x.transpose(0, 2, 3, 1)), 2))
    np.testing.assert_array_equal(ours, ref)  # exact: pure data movement
    back = unpatchify(jnp.asarray(ours), 2, 6, 4, 3)
    np.testing.assert_array_equal(np.asarray(back), x.transpose(0, 2, 3, 1))


def test_per_token_inverse_of_each_block_reconstructs_input():
    model = tiny_flow(num_blocks=2)  # one identity-order and one flipped block
    params = randomized_params(model)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 2))
    y = jnp.array([3, -1])
    tokens = patchify(x, 2)
    forward = jax.jit(lambda i, v: model.apply(params, i, v, y, method=TARFlow.block_forward), static_argnums=0)
    transform = jax.jit(lambda i, v: model.apply(params, i, v, y, method=TARFlow.block_transform),
                        static_argnums=0)
    for i in range(model.num_blocks):
        z = forward(i, tokens)[0]
        flip = bool(i % 2)
        z_perm = z[:, ::-1] if flip else z
        rec = z_perm.at[:, 1:].set(0.0)  # only token 0 is known at the start
        for t in range(z.shape[1] - 1):  # naive: rerun the whole transformer for every token
            a, b, _ = transform(i, rec)
            rec = rec.at[:, t + 1].set(z_perm[:, t + 1] * jnp.exp(a[:, t + 1]) + b[:, t + 1])
        rec = rec[:, ::-1] if flip else rec
        assert float(jnp.max(jnp.abs(z - tokens))) > 1e-2, "block is near identity: test has no teeth"
        np.testing.assert_allclose(np.asarray(rec), np.asarray(tokens), atol=1e-5, rtol=0)
        tokens = z


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_logdet_equals_float64_jacobian(clip):
    with enable_x64():
        model = tiny_flow(dtype=jnp.float64, clip=clip)
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), randomized_params(model))
        x = jax.random.normal(jax.random.PRNGKey(5), (1, 4, 4, 2), jnp.float64)
        y = jnp.array([7])

        def flat_forward(v):
            return model.apply(params, v.reshape(x.shape), y).z.reshape(-1)

        jac = jax.jit(jax.jacfwd(flat_forward))(x.reshape(-1))
        sign, logabsdet = jnp.linalg.slogdet(jac)
        out = jax.jit(model.apply)(params, x, y)
        dims = x.size
        ours = float(jnp.sum(out.logdets)) * dims  # logdets are per-dimension means
        assert jac.dtype == jnp.float64
        assert abs(float(logabsdet)) > 1e-2  # non-trivial volume change
        np.testing.assert_allclose(ours, float(logabsdet), rtol=1e-10, atol=1e-10)


def test_soft_clip_bounds_log_scale():
    model = tiny_flow(clip=0.3)
    params = randomized_params(model, scale=0.5)
    a, _, _ = model.apply(params, 0, jnp.ones((2, 4, 8)) * 3.0, jnp.array([1, 2]), method=TARFlow.block_transform)
    assert float(jnp.max(jnp.abs(a))) <= 0.3 * (1 + 1e-6)  # tanh saturates to exactly 1 in float32
    assert float(jnp.max(jnp.abs(a))) > 0.05


def test_dropped_label_uses_mean_class_embedding():
    model = tiny_flow()
    params = randomized_params(model)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 2))
    dropped = model.apply(params, x, jnp.array([-1, -1])).z
    none = model.apply(params, x, None).z
    mix = model.apply(params, x, None, jnp.full((2, 10), 0.1)).z
    labelled = model.apply(params, x, jnp.array([0, 1])).z
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(none), atol=1e-6)
    # 0.1 is not exact in float32, so the uniform mixture's matmul rounds differently from the mean
    # embedding by a few ulp, which the flow carries to |z| ~ 30 (a few ulp there is ~4e-6): relative too.
    np.testing.assert_allclose(np.asarray(mix), np.asarray(none), rtol=2e-6, atol=1e-5)
    assert float(jnp.max(jnp.abs(labelled - none))) > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_is_close():
    f32, bf16 = tiny_flow(), tiny_flow(dtype=jnp.bfloat16)
    params = randomized_params(f32, scale=0.05)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 2))
    y = jnp.array([0, 1])
    out32, out16 = f32.apply(params, x, y), bf16.apply(params, x, y)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(bf16.init(jax.random.PRNGKey(0), x, y)))
    assert out16.z.dtype == jnp.float32  # exp and the affine update stay float32
    np.testing.assert_allclose(np.asarray(out16.z), np.asarray(out32.z), atol=0.1)


def test_wrong_image_size_is_a_clear_error():
    model = tiny_flow()
    with pytest.raises(ValueError, match="expected images of shape"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2)), None)
    bad = TARFlow(img_size=5, in_channels=1, patch_size=2, channels=64, num_blocks=1, layers_per_block=1)
    with pytest.raises(ValueError, match="not divisible"):
        bad.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 1)))

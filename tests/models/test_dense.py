"""flat_dot_general: nn.Dense's contraction on a 2D view (models/dense.py).

Same values and gradients as jax.lax.dot_general (float64, 1e-12); and the property it exists
for: in the gradient of the flow and of G, every dot_general contracts a single axis (a Dense
kernel gradient over (N, T) contracts two, which XLA:CPU runs on its slow packed path).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from biflow_jax.models.dense import flat_dot_general
from biflow_jax.models.reverse import ReverseViT
from biflow_jax.models.tarflow import build_flow


def _dot_generals(jaxpr) -> list:
    """Every dot_general equation of a closed jaxpr, sub-jaxprs (pjit, custom_vjp, scan) included."""
    found = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn)
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


def _contracted_axes(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    return len(lhs_contract)


def test_value_and_gradients_equal_dot_general_in_float64():
    with enable_x64():
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(3, 5, 7)))
        w = jnp.asarray(rng.normal(size=(7, 4)))
        dims = (((2,), (0,)), ((), ()))

        def loss(fn, x, w):
            return jnp.sum(jnp.sin(fn(x, w, dims)))

        np.testing.assert_allclose(flat_dot_general(x, w, dims), jax.lax.dot_general(x, w, dims), rtol=0, atol=1e-12)
        got = jax.grad(lambda x, w: loss(flat_dot_general, x, w), argnums=(0, 1))(x, w)
        want = jax.grad(lambda x, w: loss(jax.lax.dot_general, x, w), argnums=(0, 1))(x, w)
        for g, r in zip(got, want):
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-12)


def test_other_contractions_pass_through_unchanged():
    x, w = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    dims = (((2,), (1,)), ((0,), (0,)))  # batched: not Dense's case
    np.testing.assert_array_equal(flat_dot_general(x, w, dims), jax.lax.dot_general(x, w, dims))


def test_a_plain_dense_gradient_contracts_two_axes_and_the_flat_one_only_one():
    """The check below can fail: nn.Dense's own kernel gradient over (N, T) contracts 2 axes."""
    x = jnp.ones((2, 6, 8))
    for dot_general, want in ((None, 2), (flat_dot_general, 1)):
        kw = {} if dot_general is None else {"dot_general": dot_general}
        layer = nn.Dense(4, **kw)
        params = layer.init(jax.random.key(0), x)
        jaxpr = jax.make_jaxpr(jax.grad(lambda p, layer=layer: jnp.sum(layer.apply(p, x) ** 2)))(params)
        assert max(_contracted_axes(e) for e in _dot_generals(jaxpr)) == want


@pytest.mark.parametrize("which", ["flow", "G"])
def test_every_contraction_in_the_models_gradients_is_over_one_axis(which):
    if which == "flow":
        model = build_flow(dict(img_size=8, in_channels=1, patch_size=2, channels=32, num_blocks=2,
                                layers_per_block=1, num_classes=3, head_dim=16, expansion=2, clip=0.0,
                                dtype="float32"))
        x, y = jnp.ones((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32)
        params = model.init(jax.random.key(0), x, y)

        def loss(p):
            out = model.apply(p, x, y)
            return jnp.sum(out.z ** 2) - jnp.sum(out.logdets)
    else:
        model = ReverseViT(num_tokens=16, token_dim=4, num_forward_blocks=1, depth=2, width=32, heads=2,
                           num_classes=3)
        z, y = jnp.ones((2, 16, 4)), jnp.zeros((2,), jnp.int32)
        params = model.init(jax.random.key(0), z, y)

        def loss(p):
            return sum(jnp.sum(o ** 2) for o in jax.tree.leaves(model.apply(p, z, y)))
    eqns = _dot_generals(jax.make_jaxpr(jax.grad(loss))(params))
    assert eqns and all(_contracted_axes(e) == 1 for e in eqns), sorted({_contracted_axes(e) for e in eqns})

"""R-REPA alignment: gradient routing per mode, reverse-pass features, token order, start-up checks.

Gradients are taken eagerly (no jit): for a 4-block, 16-token flow that is faster than
compiling four gradient graphs. "Zero" means exactly 0.0 (a stop-gradient gives exact
zeros); "non-zero" means a squared norm above 1e-12.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biflow_jax.benches.random_flow import perturb_proj_out
from biflow_jax.errors import ConfigError
from biflow_jax.models.registry import build_flow
from biflow_jax.models.tarflow import TARFlow, block_order, patchify
from biflow_jax.modes import train
from biflow_jax.objectives import rrepa
from biflow_jax.objectives.alignment_features import raster_features, to_grid

NUM_BLOCKS = 4


@pytest.fixture(scope="module")
def flow():
    model = TARFlow(img_size=8, in_channels=1, patch_size=2, channels=16, num_blocks=NUM_BLOCKS,
                    layers_per_block=1, head_dim=16)
    x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1), minval=-1.0, maxval=1.0)
    params = perturb_proj_out(model.init(jax.random.key(0), x), jax.random.key(2), 0.1)
    return model, params, x


def block_grad_norms(model, params, x, mode, passes, location=(2, 1)):
    """Squared gradient norm of the alignment loss alone, per flow block (blocks_0 .. blocks_3)."""
    projector = rrepa.Projector(32, 8)
    proj_params = {rrepa.location_name(location):
                   projector.init(jax.random.key(3), jnp.zeros((1, 1, model.channels)))["params"]}
    target = jax.random.normal(jax.random.key(4), (x.shape[0], 4, 8))  # 2x2 grid: tokens area-pooled

    def loss(flow_params):
        z, _, records = rrepa.forward_pass(model, flow_params, x, None)
        hiddens = rrepa.alignment_hiddens(model, flow_params, z, records, None, [location], mode, passes)
        return rrepa.alignment_loss(projector, proj_params, hiddens, target, grid=2)

    grads = jax.grad(loss)(params)["params"]
    return [float(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads[f"blocks_{i}"])))
            for i in range(model.num_blocks)]


# Aligning block 2 (1-indexed) of 4: which blocks the alignment gradient may reach (arXiv:2511.22345, docs/rrepa.md).
EXPECTED = {
    ("forward", 1): [True, True, False, False],  # block t and every earlier block
    ("detach", 1): [False, True, False, False],  # block t only
    ("reverse", 1): [False, True, True, True],  # block t and the later blocks, never earlier ones
    ("reverse", 2): [False, True, True, True],
}


@pytest.mark.parametrize("mode,passes", list(EXPECTED))
def test_alignment_gradient_reaches_exactly_the_stated_blocks(flow, mode, passes):
    model, params, x = flow
    norms = block_grad_norms(model, params, x, mode, passes)
    for i, (norm, expected) in enumerate(zip(norms, EXPECTED[(mode, passes)])):
        if expected:
            assert norm > 1e-12, f"{mode}: block {i + 1} gets no gradient ({norms})"
        else:
            assert norm == 0.0, f"{mode}: block {i + 1} gets gradient {norm} ({norms})"


@pytest.mark.parametrize("passes", [1, 2])
def test_reverse_pass_features_equal_forward_features(flow, passes):
    """Teacher forcing: the reverse pass sees the forward states in value (tolerance 1e-5)."""
    model, params, x = flow
    z, _, records = rrepa.forward_pass(model, params, x, None)
    locations = [(2, 1), (3, 1), (4, 1)]
    forward = rrepa.alignment_hiddens(model, params, z, records, None, locations, "forward")
    reverse = rrepa.alignment_hiddens(model, params, z, records, None, locations, "reverse", passes)
    for loc in locations:
        np.testing.assert_allclose(np.asarray(reverse[loc]), np.asarray(forward[loc]), atol=1e-5, rtol=0)


def test_forward_pass_matches_the_model(flow):
    model, params, x = flow
    z, logdets, _ = rrepa.forward_pass(model, params, x, None)
    out = model.apply(params, x)
    np.testing.assert_allclose(np.asarray(z), np.asarray(out.z), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(logdets), np.asarray(out.logdets), atol=1e-6, rtol=0)


def test_raster_features_undo_the_flip_and_the_shift(flow):
    """Block 2 (index 1) is flipped. Changing raster token r must leave the features of raster
    tokens >= r unchanged (in the flipped block they come before r, or are r itself, whose
    feature is the state that saw only tokens before it) and change those of tokens < r.
    Without undoing the flip the changed set would be raster tokens > 10; without undoing
    the shift token r itself would change."""
    model, params, x = flow
    tokens = patchify(x, model.patch_size)
    r = 5
    bumped = tokens.at[:, r].add(0.5)

    def features(t):
        hidden = model.apply(params, 1, block_order(t, True), None,
                             method=TARFlow.block_transform)[2][0]
        return np.asarray(raster_features(hidden, flip=True))

    changed = np.abs(features(bumped) - features(tokens)).max(axis=(0, 2)) > 1e-6
    np.testing.assert_array_equal(changed, np.arange(tokens.shape[1]) < r)


def test_raster_features_positions():
    """Block-order hidden t holds the value t: raster token r of a flipped 4-token block is
    block token 3 - r, fed by hidden 2 - r (token 0, raster 3, by hidden 0)."""
    hidden = jnp.arange(4.0)[None, :, None]
    np.testing.assert_array_equal(np.asarray(raster_features(hidden, flip=True))[0, :, 0], [2, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(raster_features(hidden, flip=False))[0, :, 0], [0, 0, 1, 2])


def test_to_grid_area_pools_and_keeps_matching_grids():
    features = jnp.arange(16.0).reshape(1, 16, 1)  # 4x4 grid, value = raster index
    pooled = np.asarray(to_grid(features, 2))[0, :, 0]
    np.testing.assert_allclose(pooled, [2.5, 4.5, 10.5, 12.5], atol=1e-6)
    assert to_grid(features, 4) is features
    assert to_grid(features, 3).shape == (1, 9, 1)


def digits_align_config(**align):
    from configs import digits_align

    config = digits_align.get_config("quick")
    config.model.update(channels=16, head_dim=16, layers_per_block=1)
    config.align.update(align)
    return config


def test_training_without_weights_fails_at_start_naming_the_file(tmp_path):
    config = digits_align_config()
    assert config.align.weights == "" and not config.align.random_init
    workdir = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="align.weights") as err:
        train.train_and_evaluate(config, str(workdir))
    message = str(err.value)
    assert "dinov2_vits14_pretrain.pth" in message and "facebook/dinov2-small" in message
    assert not workdir.exists()  # it failed before touching the workdir, let alone training


def test_objective_adds_weighted_alignment_to_nll():
    """A constant teacher on a 2x2 grid stands in for DINOv2 (whose port has its own tests)."""
    config = digits_align_config(projector_hidden=32, weight=0.5, locations=[(3, 1), (4, 1)])
    model = build_flow(config.model)
    teacher = rrepa.ConstantTeacher(jax.random.normal(jax.random.key(5), (4, 8)))
    objective = rrepa.make(config, model, teacher)
    params = objective.init(jax.random.key(0))
    assert set(params["projectors"]) == {"block3_layer1", "block4_layer1"}
    assert objective.flow_params(params) is params["flow"]
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    batch = {"image": jnp.asarray(images), "label": jnp.arange(4) % 10}
    loss, metrics = objective.loss(params, batch, jax.random.key(1), jnp.arange(4), objective.frozen)
    assert -1.0 <= float(metrics["align"]) <= 1.0
    np.testing.assert_allclose(float(loss), float(metrics["nll"]) + 0.5 * float(metrics["align"]), rtol=1e-6)
    assert float(metrics["loss"]) == float(loss)


def test_invalid_location_is_a_config_error():
    config = digits_align_config(random_init=True, encoder="tiny", locations=[(5, 1)])
    with pytest.raises(ConfigError, match="align.locations block 5"):
        rrepa.validate_align(config)

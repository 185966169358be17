"""Stage-2 training: the forward flow stays frozen, every loss term learns, bad set-ups fail at start."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biflow_jax import checkpoint, reverse_training, train
from biflow_jax.config_checks import ConfigError
from biflow_jax.data import input_pipeline
from biflow_jax.models.tarflow import build_flow
from configs import digits


def tiny_config():
    config = digits.get_config("quick")
    config.model.update(channels=64, num_blocks=2, layers_per_block=1)
    config.reverse.update(depth=3, width=32, heads=2)
    config.train.update(batch_size=32, log_every=10, eval_every=1000, checkpoint_every=1000)
    config.reverse_train.update(steps=40, lr=3e-3)
    return config


@pytest.fixture(scope="module")
def forward_workdir(tmp_path_factory):
    """A stage-1 workdir holding randomly initialised flow params (no training needed)."""
    config = tiny_config()
    config.stage = "flow"
    model = build_flow(config.model)
    params = model.init(jax.random.key(1), *checkpoint.example_inputs(config))
    # Perturb the zero-initialised output layers so the trajectory is not the identity.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.02 * jax.random.normal(jax.random.key(len(str(path))), p.shape)
        if "proj_out" in jax.tree_util.keystr(path) else p, params)
    workdir = str(tmp_path_factory.mktemp("stage1"))
    checkpoint.save_flow(workdir, config, params)
    return workdir


def test_steps_keep_flow_bit_identical_and_every_term_decreases(forward_workdir):
    config = reverse_training.stage2_config(tiny_config(), forward_workdir)
    flow, flow_params = reverse_training.load_forward(config)
    before = jax.tree_util.tree_map(np.array, flow_params)
    reverse = reverse_training.build_models(config, flow)
    objective = reverse_training.biflow_objective(flow, flow_params, reverse, config)
    mesh = train.make_mesh()
    optimizer = train.make_optimizer(config)
    state = train.init_state(objective, optimizer, config, mesh)
    step = train.make_train_step(objective.loss, optimizer, config, mesh)
    batch = next(input_pipeline.train_batches(config))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train.AXIS))
    batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
    history = []
    for _ in range(40):  # one fixed batch: every term must fit it
        state, metrics = step(state, batch, objective.frozen)
        history.append(jax.device_get(metrics))
    terms = [k for k in history[0] if k.startswith(("align", "denoise"))]
    assert len(terms) == flow.num_blocks + 1  # one aligned state per block, plus denoising
    for key in terms:  # raw per-term MSEs
        values = np.array([h[key] for h in history])
        assert np.isfinite(values).all(), key
        assert values[-5:].mean() < 0.8 * values[:5].mean(), (key, values[:5], values[-5:])
    # The adaptively weighted total is ~1 per term by design (d / (d + c)); it must still fall.
    loss = np.array([h["loss"] for h in history])
    assert np.isfinite(loss).all() and loss[-5:].mean() < loss[:5].mean() - 0.1, loss
    after = jax.tree_util.tree_map(np.array, objective.frozen["flow"])
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(a, b)  # bit-identical


def test_train_reverse_end_to_end_leaves_stage1_checkpoint_untouched(forward_workdir, tmp_path):
    _, _, before = checkpoint.load_flow(forward_workdir)
    config = tiny_config()
    config.reverse_train.steps = 10
    results = reverse_training.train_reverse(reverse_training.stage2_config(config, forward_workdir),
                                             str(tmp_path / "stage2"))
    assert np.isfinite(results["test_recon_mse"])
    _, _, after = checkpoint.load_flow(forward_workdir)
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    saved, reverse, params, _, _ = reverse_training.load_reverse(str(tmp_path / "stage2"))
    out = reverse.apply(params, jnp.zeros((2, 16, 4)), jnp.array([1, 2]), None)
    assert out.image_tokens.shape == (2, 16, 4)
    from PIL import Image

    from biflow_jax.modes import edit

    inpainted = edit.run_inpaint(str(tmp_path / "stage2"), count=4)
    edited = edit.run_class_edit(str(tmp_path / "stage2"), count=2)
    # 5 rows of 4 images / 2 rows of 1 + 10 images, each 8x8 enlarged 4x, 2-pixel padding.
    assert Image.open(inpainted["grid"]).size == (4 * 34 + 2, 5 * 34 + 2)
    assert Image.open(edited["grid"]).size == (11 * 34 + 2, 2 * 34 + 2)


def test_stage2_without_or_with_mismatched_stage1_fails_at_start(forward_workdir, tmp_path):
    workdir = str(tmp_path / "never")
    config = tiny_config()
    with pytest.raises(ConfigError, match="forward_workdir"):
        reverse_training.train_reverse(config, workdir)
    with pytest.raises(FileNotFoundError, match="no such workdir"):
        reverse_training.train_reverse(reverse_training.stage2_config(config, str(tmp_path / "missing")), workdir)
    config.model.channels = 128
    with pytest.raises(ConfigError, match=r"model.channels: 64 -> 128"):
        reverse_training.train_reverse(reverse_training.stage2_config(config, forward_workdir), workdir)
    config = tiny_config()
    config.data.num_classes = 0
    config.model.num_classes = 0
    with pytest.raises(ConfigError, match="num_classes"):
        reverse_training.train_reverse(reverse_training.stage2_config(config, forward_workdir), workdir)
    assert not os.path.exists(workdir)

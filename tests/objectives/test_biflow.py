"""Stage-2 training: the forward flow stays frozen, every loss term learns, bad set-ups fail at start."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.configs import tiny_config
from PIL import Image

from biflow_jax import evaluators, optim, runs, sharding, trainer
from biflow_jax.data import input_pipeline
from biflow_jax.errors import ConfigError
from biflow_jax.models import registry
from biflow_jax.modes import edit, train
from biflow_jax.objectives import biflow


def stage2_config():
    """A 64-wide 2-block flow and a 3-layer G, 40 steps of stage 2 at a high learning rate."""
    config = tiny_config("biflow", channels=64, head_dim=None)
    config.biflow.train.update(batch_size=32, log_every=10, eval_every=1000, checkpoint_every=1000, steps=40)
    config.biflow.optim.update(lr=3e-3)
    return config


@pytest.fixture(scope="module")
def forward_workdir(tmp_path_factory):
    """A stage-1 workdir holding randomly initialised flow params (no training needed)."""
    config = stage2_config()
    config.stage = "flow"
    model = registry.build_flow(config.model)
    params = model.init(jax.random.key(1), *registry.flow_example_inputs(config.model))
    # Perturb the zero-initialised output layers so the trajectory is not the identity.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.02 * jax.random.normal(jax.random.key(len(str(path))), p.shape)
        if "proj_out" in jax.tree_util.keystr(path) else p, params)
    workdir = str(tmp_path_factory.mktemp("stage1"))
    runs.save_flow(workdir, config, params)
    return workdir


def test_steps_keep_flow_bit_identical_and_every_term_decreases(forward_workdir):
    config = stage2_config()
    flow_run = runs.load_flow(forward_workdir)
    before = jax.tree_util.tree_map(np.array, flow_run.params)
    objective = biflow.make(config, flow_run)
    mesh = sharding.make_mesh()
    optimizer = optim.make_optimizer(config.biflow.optim, config.biflow.train.steps)
    state = trainer.init_state(objective, optimizer, 0, config.parallel, mesh)
    step = trainer.make_train_step(objective.loss, optimizer, config.biflow.train, config.parallel, mesh)
    batch = next(input_pipeline.train_batches(config.data, config.biflow.train.batch_size, 0))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.AXIS))
    batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
    history = []
    for _ in range(40):  # one fixed batch: every term must fit it
        state, metrics = step(state, batch, objective.frozen)
        history.append(jax.device_get(metrics))
    terms = [k for k in history[0] if k.startswith(("align", "denoise"))]
    assert len(terms) == flow_run.model.num_blocks + 1  # one aligned state per block, plus denoising
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


def train_stage2(config, workdir, flow_workdir):
    """Stage 2 through the trainer alone (no comparison grids): its final evaluation."""
    flow_run = runs.load_flow(flow_workdir)
    mesh = sharding.make_mesh()
    reverse = biflow.build_reverse(config, flow_run.model)
    evals = evaluators.for_biflow_stage(config, flow_run, reverse, mesh)
    return trainer.run(biflow.make(config, flow_run), evals, config, workdir, "biflow", mesh,
                       flow_workdir=flow_workdir)


def test_stage2_end_to_end_leaves_stage1_checkpoint_untouched(forward_workdir, tmp_path):
    before = runs.load_flow(forward_workdir).params
    config = stage2_config()
    config.biflow.train.steps = 10
    results = train_stage2(config, str(tmp_path / "stage2"), forward_workdir)
    assert np.isfinite(results["test_recon_mse"])
    after = runs.load_flow(forward_workdir).params
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    run = runs.load_reverse(str(tmp_path / "stage2"))
    assert os.path.samefile(run.flow.workdir, forward_workdir)
    out = run.model.apply(run.params, jnp.zeros((2, 16, 4)), jnp.array([1, 2]), None)
    assert out.image_tokens.shape == (2, 16, 4)
    assert run.model.num_classes == run.flow.model.num_classes == 10  # G's table is the flow's
    inpainted = edit.run_inpaint(str(tmp_path / "stage2"), num_images=4)
    edited = edit.run_class_edit(str(tmp_path / "stage2"), num_images=2)
    # 5 rows of 4 images / 2 rows of 1 + 10 images (8x8 enlarged 4x, or 5x under "source"), 2-pixel
    # padding, under caption bands (tests/modes/test_edit.py checks the grids and figures).
    assert Image.open(inpainted["grid"]).size[1] > 5 * 34 + 2
    assert Image.open(edited["grid"]).size[1] > 2 * 42 + 2
    assert inpainted["metrics"]["known_max_abs_diff_255"] == 0


def test_stage2_without_or_with_mismatched_stage1_fails_at_start(forward_workdir, tmp_path):
    workdir = str(tmp_path / "never")
    config = stage2_config()
    with pytest.raises(ConfigError, match="biflow.flow_init"):
        train.train_and_evaluate(config, workdir)
    config.biflow.flow_init = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no such workdir"):
        train.train_and_evaluate(config, workdir)
    config.biflow.flow_init = forward_workdir
    config.model.channels = 128
    with pytest.raises(ConfigError, match=r"model.channels: 64 -> 128"):
        train.train_and_evaluate(config, workdir)
    config = stage2_config()
    config.biflow.flow_init = forward_workdir
    config.data.num_classes = 0
    config.model.num_classes = 0
    with pytest.raises(ConfigError, match="num_classes"):
        train.train_and_evaluate(config, workdir)
    assert not os.path.exists(workdir)

"""Hostile workdirs and checkpoints: one tiny folder-data run (4 steps, checkpoints at 2 and 4) whose test
split holds an image that does not decode, then its checkpoint files tampered with."""

import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from helpers.configs import quick_config
from helpers.paths import REPO
from hostile_files import assert_one_line_exit_2, cli, flip_byte, folder_run

from biflow_jax import checkpoint, runs
from biflow_jax.errors import CheckpointError, ConfigError
from biflow_jax.modes import train as train_mode


def steps_of(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, the error that ended it): training stops at step 4's evaluation (after its save)."""
    return folder_run(tmp_path_factory)


def test_a_damaged_test_image_stops_the_run_after_the_save_of_that_step(run):
    """Case: a damaged test-split image stopped the run at the evaluation before the save of the same step."""
    workdir, err = run
    assert "test/b/1.png' in data.folder could not be decoded" in str(err)
    assert steps_of(workdir) == [2, 4]  # step 4 was saved before its evaluation failed


def test_a_flipped_byte_in_a_checkpoint_reads_as_damaged_and_falls_back(run, tmp_path, caplog):
    """Case: one flipped byte in a checkpoint's data file sampled with one weight changed, exit 0."""
    workdir = str(tmp_path / "flipped")
    shutil.copytree(run[0], workdir)
    step2 = runs.load_flow(workdir).params
    data = sorted(glob.glob(os.path.join(workdir, "checkpoints", "4", "ema_params", "ocdbt.process_0", "d", "*")))
    assert data and os.path.isfile(os.path.join(workdir, "checkpoints", "4", checkpoint.CHECKSUM_FILE))
    flip_byte(max(data, key=os.path.getsize))
    with caplog.at_level(logging.WARNING):
        loaded = runs.load_flow(workdir)
    assert loaded.step == 2
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "differs from the checksum" in warnings[0] and "/4/ema_params/" in warnings[0]
    mngr = checkpoint.manager(workdir, async_save=False)
    expected = checkpoint.restore_item(mngr, 2, "ema_params")
    mngr.close()
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           loaded.params, expected)  # exactly step 2's weights
    assert jax.tree_util.tree_structure(loaded.params) == jax.tree_util.tree_structure(step2)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "2", "ema_params", "ocdbt.process_0", "d", "*")):
        flip_byte(path)
    with pytest.raises(CheckpointError, match="every checkpoint of workdir .* is damaged"):
        runs.load_flow(workdir)


def test_a_workdir_path_with_glob_characters_is_refused_before_anything_is_written(tmp_path):
    """Case: a workdir path holding [ or ] trained 'successfully', then every checkpoint read as damaged."""
    workdir = str(tmp_path / "run[1]")
    with pytest.raises(ConfigError, match=r"contains \[ \]"):
        train_mode.train_and_evaluate(quick_config("flow", 2), workdir)
    returncode, stderr = cli("--config=configs/digits.py:quick", f"--workdir={workdir}", cwd=REPO)
    assert_one_line_exit_2(returncode, stderr, "run[1]", "contains [ ]")
    assert not os.path.exists(workdir)


def test_batch_larger_than_the_data_and_zero_sample_images_fail_before_the_workdir_is_written(tmp_path):
    """Case: train.batch_size=100000000 wrote a workdir before failing; sample.num_images=0 failed only
    after training, naming a flag (--num_images) the user never set."""
    workdir = str(tmp_path / "run")
    config = quick_config("flow", 40)
    config.train.batch_size = 100_000_000
    with pytest.raises(ConfigError, match=r"train.batch_size=100000000 is larger than the training split"):
        train_mode.train_and_evaluate(config, workdir)
    config = quick_config("both", 40)
    config.sample.num_images = 0
    with pytest.raises(ConfigError, match=r"^sample.num_images=0 must be a positive"):
        train_mode.train_and_evaluate(config, workdir)
    assert not os.path.exists(workdir)

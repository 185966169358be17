"""Hostile sampling requests on a tiny stage-1 run: nothing is lost after the work,
nothing garbage is written with exit 0, a read-only workdir is one line, and a run outside the workdir's
tree is only read."""

import json
import math
import os
import shutil

import numpy as np
import pytest
from hostile_files import assert_one_line_exit_2, cli, digests, folder_run, read_only

from biflow_jax import runs
from biflow_jax.errors import ConfigError, UnwritableError
from biflow_jax.modes import sample


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A stage-1 run of a tiny flow (the hostile suite's shared 4-step folder-data run)."""
    return folder_run(tmp_path_factory)[0]


def test_two_hundred_labels_are_sampled_into_a_short_hashed_folder(job):
    """Case: --labels= with 200 labels sampled everything, then died on 'File name too long'."""
    labels = [i % 2 for i in range(200)]
    out = sample.run_sample(job, sampler="exact", num_images=4, labels=labels)
    name = os.path.basename(out["out_dir"])
    assert len(name.encode()) <= 255 and name.startswith("exact_w0_seed0_n4_labels200x"), name
    assert name != sample.folder_name("exact", 0.0, 0, 4, labels[:-1] + [3])  # other labels, other folder
    with np.load(out["samples_npz"]) as saved:
        assert saved["images"].shape[0] == 4 and list(saved["labels"]) == labels[:4]
    short = sample.folder_name("biflow", 1.0, 0, 3, [1, 2, 3])
    assert short == "biflow_w1_seed0_n3_labels1-2-3"  # a short list is still spelled out


def test_nonfinite_guidance_is_refused_before_anything_is_written(job):
    """Case: --mode=sample --w=nan wrote a folder of garbage, exit 0."""
    before = digests(job)
    for w in (math.nan, math.inf):
        with pytest.raises(ConfigError, match="--w=.* must be a finite number"):
            sample.run_sample(job, sampler="exact", w=w)
    settings = sample.sample_settings(None) | {"noise_scale": float("nan")}
    with pytest.raises(ConfigError, match="sample.noise_scale=nan must be a finite"):
        sample.check_settings(settings)
    assert digests(job) == before


def test_zero_images_names_the_flag_or_the_config_key_the_user_set():
    """Case: sample.num_images=0 failed naming a flag (--num_images) the user never set."""
    settings = sample.sample_settings(None)
    with pytest.raises(ConfigError, match=r"^sample.num_images=0 must be a positive"):
        sample.check_settings(settings | {"num_images": 0})
    with pytest.raises(ConfigError, match=r"^--num_images=0 must be a positive"):
        sample.check_settings(settings, num_images=0)


def test_read_only_workdir_is_one_line_and_out_dir_elsewhere_samples_it(job, tmp_path):
    """Case: a read-only workdir gave an OSError [Errno 30] traceback, even with --out_dir elsewhere."""
    workdir = str(tmp_path / "ro_job")
    shutil.copytree(job, workdir)
    shutil.rmtree(os.path.join(workdir, "samples"), ignore_errors=True)
    before = digests(workdir)
    with read_only(workdir):
        returncode, stderr = cli(f"--workdir={workdir}", "--mode=sample", "--num_images=2")
        assert_one_line_exit_2(returncode, stderr, workdir, "cannot be written", "read-only")
        with pytest.raises(UnwritableError, match="read-only"):
            sample.run_sample(workdir, num_images=2)
        elsewhere = str(tmp_path / "elsewhere")
        out = sample.run_sample(workdir, num_images=2, out_dir=elsewhere)
        assert os.path.isfile(out["samples_png"]) and out["out_dir"] == elsewhere
    assert digests(workdir) == before


def test_a_flow_outside_the_stage_2_tree_is_read_never_written(job, tmp_path):
    """Case: a stage.json whose flow_workdir is absolute made --mode=sample write TensorBoard events and a
    lock into that other run."""
    stage2 = str(tmp_path / "stage2")  # what sampling its flow reads of it: config.json and stage.json
    os.makedirs(stage2)
    shutil.copy(os.path.join(job, "config.json"), stage2)
    flow_dir = os.path.abspath(job)
    with open(os.path.join(stage2, runs.STAGE_FILE), "w") as f:
        json.dump({"stage": "biflow", "objective": "biflow", "flow_workdir": flow_dir}, f)
    before = digests(flow_dir)
    with sample.writing_into(stage2, "flow") as owned:
        assert owned == [stage2]  # the flow it inverts is not locked
    out = sample.run_sample(stage2, sampler="exact", num_images=2)
    assert out["out_dir"].startswith(stage2) and os.path.isfile(out["samples_npz"])
    assert digests(flow_dir) == before  # no lock file, no events file, nothing

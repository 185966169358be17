"""--mode=eval: resumable FID sampling (SIGKILL mid-run, rerun = uninterrupted run), ADM npz, --samples.

Random Inception weights at 75 px (the FID weights are not on this machine), a randomly
initialised digits flow (no training), chunks of 4 samples.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers.configs import quick_config
from helpers.paths import REPO

from biflow_jax import runs
from biflow_jax.data import input_pipeline
from biflow_jax.errors import ConfigError
from biflow_jax.evaluators import ref_stats, sample_fid
from biflow_jax.models import registry
from biflow_jax.modes import eval as eval_mode

N, CHUNK = 96, 4
FID_OVERRIDES = dict(inception_size=75, batch_size=4, chunk_size=CHUNK)


def _config():
    config = quick_config("flow", 10)
    config.evals.fid.update(**FID_OVERRIDES)
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A stage-1 workdir with random flow params and a random-Inception reference of the digits test split."""
    root = tmp_path_factory.mktemp("eval")
    config = _config()
    model = registry.build_flow(config.model)
    params = model.init(jax.random.key(3), *registry.flow_example_inputs(config.model))
    workdir = str(root / "flow")
    runs.save_flow(workdir, config, params)
    ref = str(root / "ref.npz")
    ref_stats.compute(config, ref, split="test", num_images=40, random_inception=True)
    return workdir, ref


def _cli(workdir: str, ref: str) -> list[str]:
    return [sys.executable, "-m", "biflow_jax.main", "--mode=eval", f"--workdir={workdir}", f"--ref={ref}",
            "--random_inception", f"--num_images={N}"] + [f"--config.evals.fid.{k}={v}" for k, v in
                                                          FID_OVERRIDES.items()]


def _eval_dir(workdir: str) -> str:
    (name,) = os.listdir(os.path.join(workdir, "eval"))
    return os.path.join(workdir, "eval", name)


def test_killed_run_resumes_to_the_uninterrupted_result(setup, tmp_path):
    workdir, ref = setup
    killed = str(tmp_path / "killed")
    shutil.copytree(workdir, killed, ignore=shutil.ignore_patterns("eval"))  # another test's eval may be there
    proc = subprocess.Popen(_cli(killed, ref), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks, deadline = [], time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        chunks = glob.glob(os.path.join(killed, "eval", "*", "chunks", "chunk_*.npz"))  # not the .tmp files
        if chunks:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= len(chunks) < N // CHUNK, f"the run was not killed mid-sampling ({len(chunks)} chunks)"
    assert not os.path.exists(os.path.join(_eval_dir(killed), "samples.npz"))

    out = subprocess.run(_cli(killed, ref), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "already in" in out.stdout and "RANDOM-INCEPTION" in out.stdout, out.stdout

    # The uninterrupted run, in this process.
    config = runs.read_config(workdir)
    config.evals.fid.update(**FID_OVERRIDES)
    record = eval_mode.run_eval(workdir, config, ref=ref, num_samples=N, random_inception=True)

    resumed = _eval_dir(killed)
    whole = os.path.join(workdir, "eval", os.path.basename(resumed))  # the same run: the same folder name
    assert os.path.isdir(whole), os.listdir(os.path.join(workdir, "eval"))
    with np.load(os.path.join(resumed, "samples.npz")) as a, np.load(os.path.join(whole, "samples.npz")) as b:
        assert sorted(a.files) == ["arr_0", "arr_1"]  # ADM's sample format
        assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (N, 8, 8, 1)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        np.testing.assert_array_equal(a["arr_1"], np.arange(N) % 10)  # class-balanced
        assert len(np.unique(a["arr_0"].reshape(N, -1), axis=0)) == N  # distinct samples, not one chunk repeated
    with open(os.path.join(resumed, "metrics.json")) as f:
        resumed_figures = json.load(f)["figures"]
    assert resumed_figures == record["figures"]
    assert record["random_inception"] and set(record["figures"]) == {"fid", "sfid", "inception_score", "precision",
                                                                       "recall"}
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))  # TensorBoard


def test_samples_flag_scores_an_external_file(setup, tmp_path):
    workdir, ref = setup
    images, labels = input_pipeline.split_arrays(_config().data, "test")
    real = tmp_path / "real_digits.npz"
    np.savez(real, images[-40:], labels[-40:])  # arr_0, arr_1: what ml-tarflow or ADM's scripts write
    noise = tmp_path / "noise.npz"
    np.savez(noise, np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8))
    config = _config()
    real_scores = eval_mode.run_eval(str(tmp_path), config, ref=ref, samples=str(real), random_inception=True)
    noise_scores = eval_mode.run_eval(str(tmp_path), config, ref=ref, samples=str(noise), random_inception=True)
    assert real_scores["num_samples"] == 40 and real_scores["labels"] == 40
    assert real_scores["figures"]["fid"] < noise_scores["figures"]["fid"]
    assert real_scores["figures"]["precision"] > noise_scores["figures"]["precision"]
    assert os.path.isfile(tmp_path / "eval" / "samples_real_digits" / "metrics.json")


def test_bad_input_fails_before_sampling(setup, tmp_path):
    workdir, ref = setup
    config = _config()
    with pytest.raises(ConfigError, match="reference is empty"):
        eval_mode.run_eval(workdir, config, random_inception=True)
    with pytest.raises(ConfigError, match="pt_inception-2015-12-05-6726825d.pth"):
        eval_mode.run_eval(workdir, config, ref=ref)
    config.evals.fid.inception_size = 80  # another feature space than the reference's
    with pytest.raises(ConfigError, match="other Inception features"):
        eval_mode.run_eval(workdir, config, ref=ref, random_inception=True, num_samples=8)
    with pytest.raises(ValueError, match="arr_0"):
        np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
        eval_mode.run_eval(str(tmp_path), _config(), ref=ref, samples=str(tmp_path / "x.npz"), random_inception=True)
    assert not glob.glob(os.path.join(workdir, "eval", "*_n8_*"))  # nothing sampled for the refused run


def test_paper_config_names_the_adm_reference_file():
    from configs import imagenet64

    for stage in ("flow", "biflow"):
        settings = sample_fid.fid_settings(imagenet64.get_config("p2"), stage)
        assert settings["num_samples"] == 50_000 and settings["every"] == -1
        with pytest.raises(ConfigError, match="VIRTUAL_imagenet64_labeled.npz"):
            sample_fid.check_settings(settings)
    assert sample_fid.fid_settings(imagenet64.get_config("p2"), "flow")["guidance"] == 1.7


def test_fid_evaluator_in_training_matches_eval_mode(setup):
    """The `fid` evaluator (features on the device, in memory) scores what --mode=eval (via its npz) scores."""
    from biflow_jax import evaluators, sharding
    from biflow_jax.objectives import flow

    workdir, ref = setup
    config = _config()
    config.evals.fid.update(every=5, train_samples=16, reference=ref, random_inception=True)
    run = runs.load_flow(workdir)
    objective = flow.make(config, run.model)
    evals = evaluators.for_flow_stage(config, run.model, objective.flow_params, sharding.make_mesh())
    (fid_eval,) = [e for e in evals if e.name == "fid"]
    assert fid_eval.every == 5
    figures = fid_eval(run.params)
    record = eval_mode.run_eval(workdir, config, ref=ref, num_samples=16, random_inception=True)
    assert set(figures) == {"random_inception_fid_16", "random_inception_sfid", "random_inception_inception_score",
                            "random_inception_precision", "random_inception_recall"}
    assert figures["random_inception_fid_16"] == pytest.approx(record["figures"]["fid"], rel=1e-4)
    assert figures["random_inception_sfid"] == pytest.approx(record["figures"]["sfid"], rel=1e-4)
    assert figures["random_inception_precision"] == record["figures"]["precision"]

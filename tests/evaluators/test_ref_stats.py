"""ref_stats: an ADM-format reference batch from a dataset, with random Inception weights (no FID weights here).

The statistics must not depend on the batch size (padded, masked batches), the images kept in
arr_0 are the split's first images, the file records its feature space, and a missing weights
file is one line naming pytorch-fid's file.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers.configs import quick_config
from helpers.paths import REPO

from biflow_jax.data import input_pipeline
from biflow_jax.evaluators import fid, ref_stats, sample_fid


def _config(batch_size: int):
    config = quick_config("flow", 10)
    config.evals.fid.update(inception_size=75, batch_size=batch_size)
    return config


def test_reference_batch_is_batch_size_independent(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    meta = ref_stats.compute(_config(128), str(a), split="test", num_images=20, random_inception=True)
    ref_stats.compute(_config(96), str(b), split="test", num_images=20, random_inception=True)  # 300 = 3*96 + 12
    ra, rb = fid.read_reference_batch(a), fid.read_reference_batch(b)
    assert meta["num_statistics"] == 300 and meta["inception"] == "random" and meta["inception_size"] == 75
    assert meta["convention"] == "adm" and meta["resize"] == ref_stats.RESIZE == "adm_center_crop"
    assert ra.mu.shape == (2048,) and ra.sigma.shape == (2048, 2048) and ra.sigma_s.shape == (63, 63)
    np.testing.assert_allclose(ra.mu, rb.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ra.sigma_s, rb.sigma_s, rtol=1e-4, atol=1e-6)
    test_images = input_pipeline.split_arrays(_config(128).data, "test")[0]
    np.testing.assert_array_equal(ra.images, test_images[:20])  # arr_0: the first images, uint8 NHWC
    assert ra.images.dtype == np.uint8
    assert sample_fid.read_meta(str(a))["inception"] == "random"
    assert np.trace(ra.sigma) > 0 and np.trace(ra.sigma_s) > 0


def test_missing_weights_is_one_line_naming_the_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "biflow_jax.cli.ref_stats", "--config=configs/digits.py:quick",
                          f"--out={tmp_path / 'r.npz'}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "pt_inception-2015-12-05-6726825d.pth" in lines[-1], out.stderr[-500:]
    assert "--random_inception" in lines[-1]
    assert not (tmp_path / "r.npz").exists()


def test_meta_is_json_in_the_file(tmp_path):
    path = tmp_path / "m.npz"
    fid.write_reference_batch(path, np.zeros(2), np.eye(2), np.zeros(1), np.eye(1),
                              extra={sample_fid.META_KEY: np.asarray(json.dumps({"inception": "fid"}))})
    assert sample_fid.read_meta(str(path)) == {"inception": "fid"}
    with pytest.raises(ValueError, match="sigma"):
        np.savez(tmp_path / "bad.npz", mu=np.zeros(2))
        fid.read_reference_batch(tmp_path / "bad.npz")

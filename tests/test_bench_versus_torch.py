"""`bench versus_torch --cpu_devices`: our side's batch split over the host's CPU devices, the same figures
as on one device; a batch that does not split is one line and exit 2 (run as the README runs it)."""

import json
import subprocess
import sys

from helpers.paths import REPO

TINY = ["--img_size=8", "--patch=2", "--channels=64", "--blocks=1", "--layers=1", "--batch=4", "--rounds=1",
        "--train_steps=1", "--calibration_s=0", "--skip=sample,cfg"]


def bench(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biflow_jax.bench", "versus_torch", *TINY, *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_two_cpu_devices_split_the_batch_and_report_it():
    out = bench("--cpu_devices=2")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2 and result["machine"]["device_count"] == 2
    assert result["ours_compiler_options"] == {"xla_cpu_multi_thread_eigen": False}  # one program per core
    assert "cpu x2 (our batch split over them)" in out.stdout
    assert result["ours_train_s"] > 0 and result["ours_forward_s"] > 0


def test_a_batch_that_does_not_split_over_the_devices_is_one_line_and_exit_2():
    out = bench("--cpu_devices=3")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: --batch=4 does not split over --cpu_devices=3"

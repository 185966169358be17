"""The command line as a person meets it: a mistyped config key is one line naming it, exit 2."""

import os
import subprocess
import sys

from helpers.paths import REPO

from biflow_jax import checkpoint


def run_main(*args: str, cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "biflow_jax.main", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_a_typo_in_a_config_key_is_one_line_with_a_suggestion_with_or_without_config(tmp_path):
    from configs import digits

    # With --config, from outside the repository: nothing is written.
    fresh = tmp_path / "fresh"
    with_config = run_main(f"--config={REPO}/configs/digits.py", f"--workdir={fresh}",
                           "--config.biflow.guidanc=2", cwd=str(tmp_path))
    # Without --config: the workdir's config.json is read, then the overrides are applied.
    saved = tmp_path / "saved"
    checkpoint.write_config(str(saved), digits.get_config("quick"))
    without_config = run_main(f"--workdir={saved}", "--mode=describe", "--config.biflow.guidanc=2", cwd=str(tmp_path))
    for result in (with_config, without_config):
        assert result.returncode == 2, result.stderr
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: unknown config key 'biflow.guidanc'")
        assert "did you mean 'biflow.guidance'" in lines[0]
    assert not fresh.exists()

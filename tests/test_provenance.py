"""A workdir records what made it; the training log line carries its pace."""

import json
import sys

from biflow_jax import provenance, trainer


def test_each_start_appends_command_versions_and_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["biflow_jax/main.py", "--workdir=W", "--config.train.steps=3"])
    provenance.record(str(tmp_path))
    provenance.record(str(tmp_path))
    with open(tmp_path / provenance.PROVENANCE_FILE) as f:
        history = json.load(f)
    assert len(history) == 2  # a resumed run adds an entry, never replaces the first
    entry = history[0]
    assert entry["command"][1:] == ["biflow_jax/main.py", "--workdir=W", "--config.train.steps=3"]
    assert entry["packages"]["jax"] and entry["packages"]["flax"]
    git = entry["git"]  # this checkout is a git repository
    assert git is not None and len(git["commit"]) == 40 and isinstance(git["dirty"], bool)
    assert provenance.git_state(str(tmp_path)) is None  # outside any repository


def test_pace_reports_steps_per_second_and_eta(monkeypatch):
    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: next(clock))
    pace = trainer.Pace(start=0, total=1000)
    assert pace(100) == "10.0 steps/s, ETA 1m30s"  # 100 steps in 10 s, 900 to go
    assert pace(200) == "5.0 steps/s, ETA 2m40s"  # the last interval's rate: 800 steps at 5/s

"""What made a workdir: the code version, the package versions and the command line, per invocation.

WORKDIR/provenance.json holds a list with one entry per training start (a resumed run
adds one), so a figure can be traced to the code that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

PROVENANCE_FILE = "provenance.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections", "clu", "numpy",
            "tensorflow", "tensorflow-datasets", "scikit-learn", "pillow")


def git_state(directory: str) -> dict[str, Any] | None:
    """{'commit', 'dirty'} of the checkout holding `directory`, or None outside git (or without git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def current() -> dict[str, Any]:
    """This invocation: time, command line, git state of the package's checkout, versions, devices."""
    import jax

    package_dir = os.path.dirname(os.path.abspath(__file__))
    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "git": git_state(package_dir),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} process(es))",
    }


def record(workdir: str) -> dict[str, Any]:
    """Append this invocation to WORKDIR/provenance.json (process 0 only); returns the entry."""
    import jax

    entry = current()
    if jax.process_index() != 0:
        return entry
    path = os.path.join(workdir, PROVENANCE_FILE)
    history: list[dict[str, Any]] = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                history = json.load(f)
        except (OSError, ValueError):
            history = []  # a damaged record is replaced, never a reason to stop training
    os.makedirs(workdir, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump([*history, entry], f, indent=1)
    os.replace(tmp, path)
    return entry

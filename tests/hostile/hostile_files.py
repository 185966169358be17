"""Hostile inputs made on the spot: small image folders, PNG headers that lie, and the CLI contract
(exit code 2, one `error:` line on stderr, no traceback)."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
from helpers.configs import quick_config
from helpers.paths import REPO
from PIL import Image

_RUNS: dict[str, tuple[str, Exception]] = {}


def png_declaring(path: str, width: int, height: int) -> str:
    """A valid-looking PNG (signature, IHDR, one small IDAT, IEND) whose header declares width x height
    pixels: a few hundred bytes that would decode to width * height * 3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                + chunk(b"IEND", b""))
    return path


def write_folder(root: str, per_class: dict[str, int] | None = None, size: int = 8) -> str:
    """ROOT/<split>/<class>/<i>.png: two classes of random grayscale PNGs."""
    rng = np.random.default_rng(0)
    for split, n in (per_class or {"train": 8, "test": 2}).items():
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, c, f"{i}.png"))
    return root


def break_png_data(path: str) -> None:
    """Keep a PNG's signature, IHDR and IEND, corrupt its pixel data: the cheap check at start passes it,
    decoding fails."""
    with open(path, "r+b") as f:
        data = f.read()
        start = data.index(b"IDAT") + 4
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data[start:start + 12]))


def flip_byte(path: str, offset: int | None = None) -> None:
    """XOR one byte of a file (the middle one by default)."""
    with open(path, "r+b") as f:
        size = os.path.getsize(path)
        f.seek(size // 2 if offset is None else offset)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def digests(root: str) -> dict[str, str]:
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def cli(*args: str, module: str = "biflow_jax.main", cwd: str = REPO) -> tuple[int, str]:
    """(exit code, stderr) of `python -m MODULE ARGS`."""
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    return out.returncode, out.stderr


def assert_one_line_exit_2(returncode: int, stderr: str, *needles: str) -> str:
    """Exit code 2, exactly one `error:` line holding every needle, no traceback; returns that line."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert returncode == 2 and len(errors) == 1 and "Traceback" not in stderr, (returncode, stderr[-3000:])
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@contextlib.contextmanager
def read_only(path: str):
    """`path` made unwritable even for root: a read-only bind mount of itself (root ignores permission
    bits; os.access and every write then see EROFS). Where mounting is not allowed, permission bits
    for a non-root user; else the test is skipped."""
    import pytest

    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "--bind", path, path], capture_output=True).returncode == 0
        if mounted and subprocess.run(["mount", "-o", "remount,bind,ro", path, path],
                                      capture_output=True).returncode == 0:
            try:
                yield path
            finally:
                subprocess.run(["umount", path], capture_output=True)
            return
        if mounted:
            subprocess.run(["umount", path], capture_output=True)
        pytest.skip("root cannot mount here, and permission bits do not stop root")
    modes = {p: os.stat(p).st_mode for p in [path, *glob.glob(os.path.join(path, "**"), recursive=True)]}
    for p in modes:
        os.chmod(p, modes[p] & ~0o222)
    try:
        yield path
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)


def folder_config(root: str, steps: int = 4):
    """A 2-block flow on ROOT's two classes of 8x8 grayscale images: checkpoints every 2 steps, the test
    bits/dim at the end."""
    config = quick_config("flow", steps)
    config.data.update(name="folder", folder=root, num_classes=2, channels=1, image_size=8)
    config.model.update(num_classes=2, in_channels=1, num_blocks=2, layers_per_block=1, channels=32, head_dim=32)
    config.train.update(batch_size=8, eval_batch_size=8, checkpoint_every=2, log_every=2, eval_every=steps)
    config.optim.update(warmup_steps=1)
    return config


def folder_run(tmp_path_factory) -> tuple[str, Exception]:
    """(workdir, the error that ended it) of one 4-step folder-data run, trained once per test process and
    shared by the modules that need a stage-1 run: its test split holds a PNG that does not decode, so
    the run stops at step 4's evaluation. Tests that change it work on copies."""
    if "run" not in _RUNS:
        import pytest

        from biflow_jax import evaluators, sharding, trainer
        from biflow_jax.errors import DataError
        from biflow_jax.models import registry
        from biflow_jax.objectives import flow

        root = write_folder(str(tmp_path_factory.mktemp("hostile_data") / "images"))
        break_png_data(os.path.join(root, "test", "b", "1.png"))
        config = folder_config(root)
        model = registry.build_flow(config.model)
        objective = flow.make(config, model)
        mesh = sharding.make_mesh()
        evals = evaluators.for_flow_stage(config, model, objective.flow_params, mesh)
        workdir = str(tmp_path_factory.mktemp("hostile_run") / "run")
        with pytest.raises(DataError) as err:
            trainer.run(objective, evals, config, workdir, "flow", mesh)
        _RUNS["run"] = (workdir, err.value)
    return _RUNS["run"]

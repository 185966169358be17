"""`--mode=compile`: programs compiled ahead of time for TPU slices by libtpu, on this CPU host.

A tiny flow (8x8 digits, width 32) so each compile takes seconds; the paper configs' figures
are in the README, from the same mode.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers.configs import tiny_config
from helpers.paths import REPO

from biflow_jax import hlo_flops, host_memory, platforms, sharding, tpu_slices
from biflow_jax.errors import ConfigError
from biflow_jax.models.attention import attention
from biflow_jax.modes import compile as compile_mode

pytest.importorskip("libtpu")


def compile_config(batch: int = 32):
    """The suite's tiny flow (2 blocks x 1 layer, width 32) with 16-d heads, at `batch` images a step."""
    config = tiny_config("both", head_dim=16)
    config.train.batch_size = batch
    return config


def test_single_host_train_step_reports_memory_analysis_and_flops(capsys, monkeypatch):
    compiled = []
    real = compile_mode.compile_program

    def recording(*args, **kwargs):
        compiled.append(real(*args, **kwargs))
        return compiled[-1]

    monkeypatch.setattr(compile_mode, "compile_program", recording)
    summary = compile_mode.run(compile_config(), "v5e:2x2", only=["flow/train_step"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(summary))  # the JSON line is printed last
    assert any("compiled flow/train_step for v5e:2x2" in line for line in out) and "train_step" in out[-2]
    (row,) = summary["programs"]
    assert (summary["chips"], summary["hosts"], row["per_chip_batch"]) == (4, 1, 8)
    # The executable's own analysis, figure by figure.
    (result,) = compiled
    memory = result.compiled.memory_analysis()
    assert row["argument_bytes"] == memory.argument_size_in_bytes > 0
    assert row["temp_bytes"] == memory.temp_size_in_bytes
    assert row["output_bytes"] == memory.output_size_in_bytes
    assert row["alias_bytes"] == memory.alias_size_in_bytes > 0  # the state is donated
    assert row["total_bytes"] == (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                  - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                                  + memory.generated_code_size_in_bytes)
    assert row["capacity_bytes"] == int(15.75 * 2**30) and row["fits"]
    assert f"{row['total_bytes'] / 2**30:.2f}" in out[-2]  # the table row shows the same total
    # FLOPs: the compiled program's matmuls against the model's count (3x the forward of batch 32; measured 0.998).
    assert row["flops_per_step"] == pytest.approx(hlo_flops.count(result.compiled.as_text()).flops * 4)
    assert 0.95 <= row["flops_ratio"] < 1.1, row


def test_multi_host_slice_splits_the_batch_over_all_chips(capsys):
    summary = compile_mode.run(compile_config(batch=64), "v5e:4x4", only=["flow/train_step"])
    (row,) = summary["programs"]
    assert (summary["chips"], summary["hosts"], row["per_chip_batch"]) == (16, 4, 4)
    assert row["fits"] and row["argument_bytes"] > 0


def test_a_batch_no_chip_holds_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "biflow_jax.main", "--mode=compile", f"--config={REPO}/configs/digits.py:quick",
         "--topology=v5e:2x2", "--programs=flow/train_step,flow/exact_inverse", "--nofit_search",
         "--config.model.channels=32", "--config.model.head_dim=16", "--config.model.num_blocks=1",
         "--config.model.layers_per_block=1",
         "--config.train.batch_size=8388608"], capture_output=True, text=True, cwd=str(tmp_path), env=env,
        timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert re.match(r"error: flow/train_step does not fit v5e:2x2: it needs [\d.]+ GiB a chip "
                    r"\(2097152 images a chip\), a v5e chip has 15\.75 GiB", lines[0]), lines[0]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["programs"][0]["fits"] is False and len(summary["programs"]) == 1
    assert summary["not_compiled"] == ["flow/exact_inverse"]  # the first program that does not fit ends the run


def test_unknown_topology_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown TPU topology 'v5e:3x3'; known: v4:2x2x1, .*v5e:2x4, .*v6e:2x2"):
        tpu_slices.get("v5e:3x3")


def test_kernels_follow_the_platform_compiled_for_not_the_host():
    q = jax.ShapeDtypeStruct((2, 16, 2, 8), jnp.float32)
    with platforms.compiling_for("tpu"):
        tpu = jax.jit(attention).lower(q, q, q).as_text()
    cpu = jax.jit(attention).lower(q, q, q).as_text()  # this host's own path: 4 query tiles
    assert tpu.count("stablehlo.dot_general") == 2 and "concatenate" not in tpu  # jax.nn.dot_product_attention
    assert cpu.count("stablehlo.dot_general") == 8 and "concatenate" in cpu
    # Inside a shard_map over TPU devices the mesh says which platform, without the context.
    mesh = sharding.make_mesh(tpu_slices.get("v5e:2x2").devices)
    spec = jax.sharding.PartitionSpec(sharding.AXIS)
    mapped = jax.shard_map(attention, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    qs = jax.ShapeDtypeStruct((8, 16, 2, 8), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, spec))
    jax.clear_caches()
    assert jax.jit(mapped).lower(qs, qs, qs).as_text().count("stablehlo.dot_general") == 2


def test_loop_bodies_count_as_often_as_they_run():
    mesh = sharding.make_mesh(tpu_slices.get("v5e:2x2").devices)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.AXIS))
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=split)
    w = jax.ShapeDtypeStruct((6, 128, 128), jnp.float32, sharding=jax.sharding.NamedSharding(mesh,
                                                                                             jax.sharding.PartitionSpec()))

    def f(x, w):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

    with platforms.compiling_for("tpu"):
        compiled = jax.jit(f).lower(x, w).compile()
    counted = hlo_flops.count(compiled.as_text())
    assert counted.flops == 6 * 2 * 16 * 128 * 128  # per chip: 16 rows, six layers
    assert counted.flops_once == counted.flops / 6 and [t for _, t in counted.loops] == [6]


def test_libtpu_without_a_tpu_leaves_the_malloc_rule_to_the_cpu(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert host_memory.accelerator_present("libtpu") is False  # installed here, no /dev/accel*, /dev/vfio
    assert host_memory.cpu_runs_the_steps()
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: ["/dev/vfio/0"] if "vfio" in pattern else [])
    assert host_memory.accelerator_present("libtpu") and not host_memory.cpu_runs_the_steps()



def test_batch_search_halves_to_the_largest_per_chip_batch_that_fits(monkeypatch):
    """On a chip shrunk to 3 MiB (the tiny step needs 2.7 MiB at 8 images a chip, 3.3 at 16): from a failed
    32 the search names the first halving that fits, and the one before it was compiled and did not."""
    chip = tpu_slices.dataclasses.replace(tpu_slices.CHIPS["v5e"], usable_hbm=3 * 2**20)
    slice_ = tpu_slices.dataclasses.replace(tpu_slices.get("v5e:2x2"), chip=chip)
    mesh = sharding.make_mesh(slice_.devices)
    tried = []
    real = compile_mode.compile_one

    def recording(config, *args):
        result = real(config, *args)
        tried.append((config.train.batch_size // 4, result.fits))
        return result

    monkeypatch.setattr(compile_mode, "compile_one", recording)
    failed = compile_mode.Result("flow", "train_step", 32, False, images=128)
    (found,) = compile_mode.largest_batch(compile_config(batch=128), failed, mesh, slice_)
    per_chip = int(re.match(r"(\d+) images a chip \(train\.batch_size=(\d+) on v5e:2x2", found).group(1))
    assert tried[-1] == (per_chip, True) and (2 * per_chip, False) in tried, tried
    assert [b for b, _ in tried] == [16 // 2**i for i in range(len(tried))]  # halving from 32

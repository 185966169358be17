"""The benches' machine record and matmul calibration: parsing, FLOP counts, rates and fractions."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biflow_jax.benches import calibration, machine, timing

# Two processors of a Zen 4 EPYC VM (abridged), then an Intel one with AMX, then an Arm core.
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
stepping\t: 1
flags\t\t: fpu sse2 avx fma avx2 f16c avx512f avx512bw avx512vl avx512_bf16 avx512_vnni sha_ni

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
stepping\t: 1
flags\t\t: fpu sse2 avx fma avx2
"""
SAPPHIRE = """processor : 0
vendor_id : GenuineIntel
cpu family : 6
model : 143
model name : Intel(R) Xeon(R) Platinum 8481C
stepping : 8
flags : avx avx2 fma avx512f avx512_fp16 amx_bf16 amx_tile amx_int8 avx_vnni
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes sve sve2 bf16 i8mm
CPU implementer\t: 0x41
CPU variant\t: 0x1
CPU part\t: 0xd40
"""


def test_cpuinfo_parsing_reads_the_first_processor_and_keeps_the_relevant_flags():
    zen4 = machine.parse_cpuinfo(ZEN4)
    assert zen4 == {"cpu_model": "AMD EPYC 9B14", "cpu_vendor": "AuthenticAMD", "cpu_family": 25,
                    "cpu_model_number": 17, "cpu_stepping": 1,
                    "cpu_flags": ["avx", "avx2", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512f", "avx512vl",
                                  "f16c", "fma"]}
    intel = machine.parse_cpuinfo(SAPPHIRE)
    assert (intel["cpu_family"], intel["cpu_model_number"], intel["cpu_stepping"]) == (6, 143, 8)
    assert {"amx_bf16", "amx_tile", "amx_int8", "avx512_fp16", "avx_vnni"} <= set(intel["cpu_flags"])
    arm = machine.parse_cpuinfo(ARM)
    assert arm["cpu_vendor"] == "0x41" and arm["cpu_model_number"] == 0xD40 and arm["cpu_stepping"] == 1
    assert arm["cpu_flags"] == ["asimd", "bf16", "i8mm", "sve", "sve2"] and arm["cpu_model"] is None
    assert machine.parse_cpuinfo("")["cpu_flags"] == []


def test_cache_sizes_come_from_sysfs_and_skip_the_instruction_cache(tmp_path):
    for index, (level, kind, size) in enumerate([("1", "Data", "32K"), ("1", "Instruction", "32K"),
                                                 ("2", "Unified", "1024K"), ("3", "Unified", "32768K")]):
        d = tmp_path / f"index{index}"
        d.mkdir()
        (d / "level").write_text(level + "\n")
        (d / "type").write_text(kind + "\n")
        (d / "size").write_text(size + "\n")
    assert machine.cache_sizes(str(tmp_path)) == {"l1d_bytes": 32 * 1024, "l2_bytes": 1024**2, "l3_bytes": 32 * 1024**2}
    assert machine.cache_sizes(str(tmp_path / "missing")) == {}
    assert machine.parse_cache_size("2M") == 2 * 1024**2 and machine.parse_cache_size("bogus") is None


def test_machine_record_of_this_process_has_every_field_and_one_line():
    record = machine.machine_record()
    assert record["cores"] == len(os.sched_getaffinity(0))
    assert record["versions"]["jax"] == jax.__version__ and "torch" in record["versions"]
    assert record["backend"] == jax.default_backend() == "cpu" and record["device_count"] == jax.device_count()
    assert record["xla_threads"] is not None and record["xla_threads"] >= 1  # XLA:CPU's pool, counted by name
    for key in ("cpu_model", "cpu_vendor", "cpu_family", "cpu_model_number", "cpu_stepping", "cpu_flags",
                "logical_cpus", "torch_threads", "xla_flags", "device_kind"):
        assert key in record
    line = machine.machine_line(record)
    assert line.startswith("machine: ") and f"family {record['cpu_family']} model {record['cpu_model_number']}" in line
    assert f"jax {jax.__version__}" in line and "backend cpu" in line and "\n" not in line


@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
def test_a_gemm_counts_the_flops_xla_counts_and_has_the_product_shape(layout):
    g = calibration.Gemm("x", 24, 40, 56, layout)
    a, b = (jnp.ones(s) for s in g.operand_shapes())
    dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, calibration.LAYOUTS[layout]))
    assert dot(a, b).shape == (g.m, g.n)
    assert g.flops == 2 * 24 * 40 * 56 == timing.compiled_flops(dot, a, b)  # XLA's cost analysis agrees


def test_backward_gemms_are_the_two_gradients_of_the_product():
    g = calibration.Gemm("up", 12, 8, 20)
    dx, dw = calibration.backward_gemms(g)
    rng = np.random.default_rng(1)
    a, b, dc = (rng.standard_normal(s) for s in ((g.m, g.k), (g.k, g.n), (g.m, g.n)))
    _, vjp = jax.vjp(lambda a, b: a @ b, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    da, db = vjp(jnp.asarray(dc, jnp.float32))
    # dx = dC (m, n) against B (k, n) in "nt"; dW = A (m, k) against dC (m, n) in "tn": autodiff's cotangents.
    np.testing.assert_allclose(jax.lax.dot_general(dc, b, calibration.LAYOUTS[dx.layout]), da, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.lax.dot_general(a, dc, calibration.LAYOUTS[dw.layout]), db, rtol=1e-5, atol=1e-5)
    assert dx.operand_shapes() == (dc.shape, b.shape) and dw.operand_shapes() == (a.shape, dc.shape)
    assert dx.flops == dw.flops == g.flops
    layer = calibration.layer_gemms(64, 16, backward=True)
    assert len(layer) == 12 and sum(x.flops for x in layer) == 3 * 2 * 64 * (16 * 48 + 16 * 16 + 2 * 16 * 64)


def test_aggregate_rate_and_fractions_are_total_flops_over_total_seconds():
    gemms = [calibration.Gemm("a", 10, 10, 10, count=2), calibration.Gemm("b", 20, 10, 10)]
    seconds = {gemms[0].key: 1e-6, gemms[1].key: 4e-6}
    # a: 2000 FLOPs twice in 2 us; b: 4000 FLOPs in 4 us -> 8000 FLOPs / 6 us.
    assert calibration.aggregate_rate(gemms, seconds) == pytest.approx(8000 / 6e-6, rel=1e-12)
    fields = timing.throughput_fields("train", flops=3e9, seconds=0.5, peak=math.nan, matmul_rate=1.2e10)
    assert fields["train_flop_per_s"] == 6e9 and fields["train_of_matmul_rate"] == pytest.approx(0.5, rel=1e-12)
    assert "train_mfu" not in fields and "x_of_matmul_rate" not in timing.throughput_fields("x", 1.0, 1.0, math.nan)
    assert timing.fmt_flops(6e9, 1.2e10) == "6.0 GFLOP/s (50% of matmul)" and timing.fmt_flops(6e9) == "6.0 GFLOP/s"


def test_the_calibrator_times_the_real_product_once_per_shape():
    g = calibration.Gemm("qkv", 32, 16, 48)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((32, 16), np.float32), rng.standard_normal((16, 48), np.float32)
    looped = calibration._looped("nn", jnp.float32)
    out = looped(a, b, np.zeros((32, 48), np.float32), 3)
    np.testing.assert_allclose(np.asarray(out), a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)  # float32 sums
    calibrator = calibration.Calibrator(target_s=1e-3, repeats=1)
    rate = calibrator.rate([g, g], "float32")
    spent = calibrator.spent_s
    assert 0 < rate < math.inf and calibrator.rate([g], "float32") == rate and calibrator.spent_s == spent
    result = calibration.calibrate({"forward": [g]}, ["float32"], target_s=1e-3)
    assert result["gemms"]["float32"]["forward"][0]["m"] == 32 and result["rates"]["float32"]["forward"] > 0
    lines = calibration.calibration_lines({"forward": [g]}, result)
    assert lines[0].startswith("matmul rate for forward (1 GEMMs m x k x n: 32x16x48): float32 ")


def test_a_gemm_pass_runs_the_same_products_on_both_sides_and_counts_its_flops():
    gemms = [calibration.Gemm("up", 24, 16, 40), calibration.Gemm("dx", 24, 40, 16, "nt", count=2),
             calibration.Gemm("dW", 16, 24, 40, "tn")]
    ours, theirs = (calibration.GemmPass(gemms, side, target_s=1e-4) for side in ("xla", "torch"))
    rng = np.random.default_rng(0)  # the seed both passes draw their operands from
    for g, got_xla, got_torch in zip(gemms, ours.products(), theirs.products()):
        a, b = (rng.standard_normal(shape, np.float32) for shape in g.operand_shapes())
        lhs, rhs = {"nn": (a, b), "nt": (a, b.T), "tn": (a.T, b)}[g.layout]
        want = lhs.astype(np.float64) @ rhs
        assert got_xla.shape == got_torch.shape == (g.m, g.n)
        np.testing.assert_allclose(got_xla, want, rtol=1e-4, atol=1e-4)  # float32 sums of <= 40 terms
        np.testing.assert_allclose(got_torch, want, rtol=1e-4, atol=1e-4)
    for p in (ours, theirs):
        assert p.reps >= 1 and p.flops == p.reps * (g_flops := sum(g.flops * g.count for g in gemms))
        assert g_flops == 2 * (24 * 16 * 40 + 2 * 24 * 40 * 16 + 16 * 24 * 40)
    with pytest.raises(ValueError, match="side must be"):
        calibration.GemmPass(gemms, "numpy")


def test_threads_and_devices_are_sized_to_the_cores_this_process_may_use(monkeypatch):
    """A container or `taskset` may give the process 3 of a 64-CPU host: `usable_cores` (which versus_torch
    also sizes torch's default thread count by) and `--cpu_devices=0` follow the affinity mask, not
    `os.cpu_count()`, and the machine record's cores say the same."""
    import argparse

    from biflow_jax.benches import versus_torch

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 9}, raising=False)
    assert machine.usable_cores() == 3
    assert versus_torch.cpu_device_count(argparse.Namespace(cpu_devices=0, batch=6)) == 3
    assert versus_torch.cpu_device_count(argparse.Namespace(cpu_devices=2, batch=6)) == 2
    with pytest.raises(ValueError, match="--batch=8 does not split over --cpu_devices=3"):
        versus_torch.cpu_device_count(argparse.Namespace(cpu_devices=0, batch=8))
    record = machine.machine_record()
    assert record["cores"] == 3 and record["logical_cpus"] == 64
    monkeypatch.delattr(os, "sched_getaffinity")  # a platform without affinity masks: the host's count
    assert machine.usable_cores() == 64

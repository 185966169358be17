"""`--mode=compile --topology=NAME`: compile every program of a config for a TPU slice, on any host.

libtpu compiles ahead of time for a topology it is only told about (`biflow_jax.tpu_slices`),
so what fits a pod is known before anyone rents it. Each stage's programs
(`modes.stage_programs`: the real train step under `config.parallel`, the FID sampling chunk of
its sampler, the Inception features) are lowered from abstract state for the slice's devices,
with kernels chosen for TPU (`platforms.compiling_for`), and compiled. Per program: the per-chip
batch, XLA's per-chip HBM (`memory_analysis`: arguments, temporaries, outputs, their total less
what outputs alias) against the chip's usable HBM, compiled matmul FLOPs with loop trip counts
applied (`hlo_flops`) beside the model FLOPs (`model_flops`), and compile seconds. The first
program that does not fit ends the run (the programs after it are listed as not compiled) with
exit 2 and one line naming it, what it needs, what the chip has, and the settings that do fit,
each found by compiling it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

import jax
import ml_collections

from biflow_jax import hlo_flops, platforms, sharding, tpu_slices
from biflow_jax.console import say
from biflow_jax.errors import ConfigError
from biflow_jax.modes import stage_programs

GB = 2**30
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass
class Result:
    stage: str
    program: str
    per_chip_batch: int
    fits: bool
    argument_bytes: int = 0
    temp_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    total_bytes: int = 0
    capacity_bytes: int = 0
    flops_per_step: float | None = None  # all chips, loop trip counts applied
    xla_flops_per_step: float | None = None  # cost_analysis, loop bodies once
    analytic_flops_per_step: float | None = None
    images: int = 0
    compile_s: float = 0.0
    loops_unread: int = 0
    compiled: Any = dataclasses.field(default=None, repr=False, compare=False)  # the executable, not reported

    @property
    def headroom_bytes(self) -> int:
        return self.capacity_bytes - self.total_bytes

    def as_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "compiled"}
        out["headroom_bytes"] = self.headroom_bytes
        out["flops_per_image"] = None if self.flops_per_step is None else self.flops_per_step / self.images
        out["analytic_flops_per_image"] = (None if self.analytic_flops_per_step is None
                                           else self.analytic_flops_per_step / self.images)
        out["flops_ratio"] = (None if not self.analytic_flops_per_step or self.flops_per_step is None
                              else self.flops_per_step / self.analytic_flops_per_step)
        return out


def required_bytes(message: str) -> int | None:
    """What XLA said a program needs, from its out-of-memory error ('... temporaries (22.42G) ...')."""
    found = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)", message) or \
        re.search(r"Used ([\d.]+)([KMGT]?) of", message)
    return None if found is None else int(float(found.group(1)) * _UNITS[found.group(2)])


def compile_program(program: stage_programs.Program, chip: tpu_slices.Chip, chips: int) -> Result:
    result = Result(program.stage, program.name, program.images // chips, False, capacity_bytes=chip.usable_hbm,
                    images=program.images, analytic_flops_per_step=program.analytic_flops)
    start = time.perf_counter()
    with platforms.compiling_for("tpu"):
        lowered = program.lower()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as err:
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            result.compile_s = time.perf_counter() - start
            result.temp_bytes = required_bytes(str(err)) or 0
            result.total_bytes = result.temp_bytes
            return result
    result.compile_s = time.perf_counter() - start
    result.compiled = compiled
    memory = compiled.memory_analysis()
    result.argument_bytes, result.temp_bytes = memory.argument_size_in_bytes, memory.temp_size_in_bytes
    result.output_bytes, result.alias_bytes = memory.output_size_in_bytes, memory.alias_size_in_bytes
    result.total_bytes = (result.argument_bytes + result.output_bytes - result.alias_bytes + result.temp_bytes
                          + memory.generated_code_size_in_bytes)
    result.fits = result.total_bytes <= chip.usable_hbm
    counted = hlo_flops.count(compiled.as_text())
    result.flops_per_step = counted.flops * chips
    result.loops_unread = sum(1 for _, trips in counted.loops if trips is None)
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    if analysis and analysis.get("flops") is not None:
        result.xla_flops_per_step = float(analysis["flops"]) * chips
    return result


def candidates(config: ml_collections.ConfigDict, stage: str, program: str) -> list[tuple[str, dict[str, Any]]]:
    """Settings to try for a program that does not fit, cheapest first: (description, overrides)."""
    out: list[tuple[str, dict[str, Any]]] = []
    if program == "train_step":
        if stage == "flow":
            for policy in ("dots", "full"):
                if config.model.remat != policy:
                    out.append((f"model.remat={policy!r}", {"model.remat": policy}))
        elif "perceptual" in config.biflow and not config.biflow.perceptual.remat:
            out.append(("biflow.perceptual.remat=True", {"biflow.perceptual.remat": True}))
        if not config.parallel.fsdp:
            out.append(("parallel.fsdp=True", {"parallel.fsdp": True}))
    return out


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def batch_key(stage: str, program: str) -> str:
    if program == "train_step":
        return "biflow.train.batch_size" if stage == "biflow" else "train.batch_size"
    return "biflow.evals.fid.batch_size" if stage == "biflow" else "evals.fid.batch_size"


def find_fits(config: ml_collections.ConfigDict, failed: Result, mesh: Any, slice_: tpu_slices.Slice
              ) -> list[str]:
    """Settings under which the failed program fits, each proven by compiling it (at most two found)."""
    found: list[str] = []
    # remat and fsdp save a fraction of the HBM; far over it, only a smaller per-chip batch can fit
    far_over = failed.total_bytes > 3 * slice_.chip.usable_hbm
    tries = [] if far_over else candidates(config, failed.stage, failed.program)
    for description, overrides in tries:
        result = compile_one(with_overrides(config, overrides), failed.stage, failed.program, mesh, slice_)
        if result.fits:
            found.append(f"{description} ({result.total_bytes / GB:.2f} GiB)")
            if len(found) == 2:
                return found
    if not found and failed.per_chip_batch > 1:
        found += largest_batch(config, failed, mesh, slice_)
    return found


def largest_batch(config: ml_collections.ConfigDict, failed: Result, mesh: Any, slice_: tpu_slices.Slice
                  ) -> list[str]:
    """The largest power-of-two per-chip batch below the failed one that fits, found by halving: a
    compile that runs out of HBM stops at XLA's buffer assignment, so the tries that fail are cheap
    (B/2's train step: 21 s at 8192 images a chip) and only the one that fits is a full compile."""
    key = batch_key(failed.stage, failed.program)
    chips = slice_.num_chips
    per_chip = failed.per_chip_batch // 2
    while per_chip >= 1:
        result = compile_one(with_overrides(config, {key: per_chip * chips}), failed.stage, failed.program, mesh,
                             slice_)
        if result.fits:
            return [f"{per_chip} images a chip ({key}={per_chip * chips} on {slice_.name}, or {failed.images} on "
                    f"{max(1, failed.images // per_chip)} chips; {result.total_bytes / GB:.2f} GiB)"]
        per_chip //= 2
    return []


def compile_one(config: ml_collections.ConfigDict, stage: str, program: str, mesh: Any,
                slice_: tpu_slices.Slice) -> Result:
    (chosen,) = [p for p in stage_programs.programs(config, mesh, stage) if p.name == program]
    return compile_program(chosen, slice_.chip, slice_.num_chips)


def check_batches(programs: list[stage_programs.Program], slice_: tpu_slices.Slice) -> None:
    for p in programs:
        if p.images % slice_.num_chips:
            raise ConfigError(f"{p.stage}/{p.name}: a global batch of {p.images} does not split over the "
                              f"{slice_.num_chips} chips of {slice_.name} ({batch_key(p.stage, p.name)})")


def gib(n: int) -> str:
    return f"{n / GB:.2f}"


def table(results: list[Result], slice_: tpu_slices.Slice) -> list[str]:
    head = ("stage", "program", "img/chip", "args GiB", "temps GiB", "out GiB", "total GiB", "of GiB", "headroom",
            "GFLOP/img", "model GFLOP/img", "ratio", "compile s")
    rows = [head]
    for r in results:
        j = r.as_json()
        per_image = "-" if j["flops_per_image"] is None else f"{j['flops_per_image'] / 1e9:.1f}"
        model = "-" if j["analytic_flops_per_image"] is None else f"{j['analytic_flops_per_image'] / 1e9:.1f}"
        ratio = "-" if j["flops_ratio"] is None else f"{j['flops_ratio']:.2f}x"
        total = gib(r.total_bytes) if r.fits else f">{gib(r.total_bytes)}" if r.total_bytes else "OOM"
        rows.append((r.stage, r.program, str(r.per_chip_batch), gib(r.argument_bytes), gib(r.temp_bytes),
                     gib(r.output_bytes), total, gib(r.capacity_bytes),
                     gib(r.headroom_bytes) if r.fits else "does not fit", per_image, model, ratio,
                     f"{r.compile_s:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return [f"{slice_.name}: {slice_.num_chips} chips ({slice_.chip.generation}, {gib(slice_.chip.usable_hbm)} GiB "
            f"usable HBM a chip), {slice_.num_hosts} host(s)"] + [
        "  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows]


def selected(program: stage_programs.Program, only: list[str] | None) -> bool:
    """`--programs=flow,biflow/one_nfe`: a stage name takes all its programs; None takes everything."""
    return not only or program.stage in only or f"{program.stage}/{program.name}" in only


def run(config: ml_collections.ConfigDict, topology: str, fit_search: bool = True,
        only: list[str] | None = None) -> dict[str, Any]:
    """Compile every program of every stage (or those `only` names) for `topology`; ConfigError (exit 2)
    if one does not fit."""
    slice_ = tpu_slices.get(topology)
    mesh = sharding.make_mesh(slice_.devices)
    if config.parallel.backend == "pmap":
        raise ConfigError("parallel.backend='pmap' runs on the devices of this host and cannot be compiled for a "
                          "TPU slice ahead of time; compile the same step with parallel.backend='jit'")
    results: list[Result] = []
    known = {s for s in stage_programs.stages(config)} | {f"{s}/{p}" for s in stage_programs.stages(config)
                                                         for p in stage_programs.PROGRAMS[s]}
    unknown = sorted(set(only or ()) - known)
    if unknown:
        raise ConfigError(f"--programs names {unknown[0]!r}; this config compiles {', '.join(sorted(known))}")
    programs = [p for stage in stage_programs.stages(config) for p in stage_programs.programs(config, mesh, stage)
                if selected(p, only)]
    check_batches(programs, slice_)
    for program in programs:
        result = compile_program(program, slice_.chip, slice_.num_chips)
        results.append(result)
        say(f"compiled {program.stage}/{program.name} for {topology} in {result.compile_s:.1f} s: "
            f"{gib(result.total_bytes)} GiB a chip" + ("" if result.fits else " (does not fit)"))
        if not result.fits:  # the config needs changing first: the rest would be compiled again after that
            break
    not_compiled = [f"{p.stage}/{p.name}" for p in programs[len(results):]]
    if not_compiled:
        say(f"not compiled, since {results[-1].stage}/{results[-1].program} does not fit: {', '.join(not_compiled)}")
    for line in table(results, slice_):
        print(line)
    summary = {"not_compiled": not_compiled,
               "topology": topology, "chips": slice_.num_chips, "hosts": slice_.num_hosts,
               "chip": slice_.chip.generation, "usable_hbm_bytes": slice_.chip.usable_hbm,
               "programs": [r.as_json() for r in results]}
    failed = [r for r in results if not r.fits]
    if failed:
        first = failed[0]
        fits = find_fits(config, first, mesh, slice_) if fit_search else []
        summary["fits_with"] = fits
        print(json.dumps(summary))
        need = f"{gib(first.total_bytes)} GiB" if first.total_bytes else "more than it has"
        hint = "; fits with " + ", or ".join(fits) if fits else "; no setting tried fits"
        raise ConfigError(f"{first.stage}/{first.program} does not fit {topology}: it needs {need} a chip "
                          f"({first.per_chip_batch} images a chip), a {slice_.chip.generation} chip has "
                          f"{gib(slice_.chip.usable_hbm)} GiB{hint}")
    print(json.dumps(summary))
    return summary

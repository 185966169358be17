"""Micro-benchmarks: `python -m biflow_jax.bench <subcommand> [--flags]`.

Each subcommand is a module of `biflow_jax.benches` with `add_arguments(parser)` and
`run(args) -> dict`; its flags are parsed by absl's argparse integration under `app.run`
(absl flags have no subcommands; `absl.flags.argparse_flags` is absl's way to have them).
It prints a readable table and, as its last line, one JSON object with the figures, so
scripts can parse `tail -n 1`. Compilation is always excluded: every timed function is
run once before timing (`benches.timing`). Every bench starts with a `machine:` line and
its JSON has the same record under "machine" (`benches.machine`): a CPU figure means
little without the CPU it came from.
"""

from __future__ import annotations

from biflow_jax import process_settings

process_settings.apply()  # process-wide, so here and not on import; before JAX runs anything

import argparse
import dataclasses
import json
from collections.abc import Callable

from absl import app
from absl.flags import argparse_flags

from biflow_jax.benches import biflow_train, compile_time, machine, sample, train, vae, versus_torch
from biflow_jax.errors import EXPECTED_ERRORS, exit_with_one_line


@dataclasses.dataclass(frozen=True)
class Subcommand:
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]
    help: str
    before_jax: Callable[[argparse.Namespace], None] | None = None  # settings JAX reads when its backend starts


SUBCOMMANDS: dict[str, Subcommand] = {
    "sample": Subcommand(sample.add_arguments, sample.run, "exact-inverse sampling: cached vs Jacobi vs naive"),
    "train": Subcommand(train.add_arguments, train.run, "R-REPA train step (reverse alignment) vs the NLL step"),
    "compile": Subcommand(compile_time.add_arguments, compile_time.run,
                          "compile time of a flow's train step: layers unrolled vs under nn.scan"),
    "versus_torch": Subcommand(versus_torch.add_arguments, versus_torch.run,
                               "train step and exact inverse: ours vs ml-tarflow's PyTorch Model (--reference)",
                               versus_torch.before_jax),
    "vae": Subcommand(vae.add_arguments, vae.run, "VAE decode ms/image (latent-space sampling)"),
    "biflow_train": Subcommand(biflow_train.add_arguments, biflow_train.run,
                               "stage-2 train step with / without the perceptual terms (LPIPS, ConvNeXt-V2)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse_flags.ArgumentParser(prog="python -m biflow_jax.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def bench(args: argparse.Namespace) -> dict:
    """Runs one subcommand: its table, then its figures as one JSON line (the machine record included)."""
    command = SUBCOMMANDS[args.command]
    if command.before_jax is not None:
        command.before_jax(args)
    print(machine.machine_line(machine.machine_record()), flush=True)
    result = command.run(args)
    result["machine"] = machine.machine_record()  # taken again after the run: the threads it really used
    print(json.dumps(result), flush=True)
    return result


def main(args: argparse.Namespace) -> None:
    bench(args)


def run() -> None:
    """Entry point: a bad flag value (an expected error) prints one line `error: ...` and exits 2."""
    try:
        app.run(main, flags_parser=lambda argv: build_parser().parse_args(argv[1:]))
    except EXPECTED_ERRORS as e:
        exit_with_one_line(e)


if __name__ == "__main__":
    run()

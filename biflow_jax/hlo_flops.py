"""Matmul FLOPs of a compiled XLA program, with every loop body counted as often as it runs.

XLA's `cost_analysis()` counts a while loop's body once, so a flow under `nn.scan` or a
token-by-token sampler looks several times cheaper than it is. This reads the optimised HLO
text (`compiled.as_text()`): every `dot` and `convolution` (TPU writes matmuls as
convolutions) contributes 2 x output elements x contraction size (`_taps`), and a computation's
count is multiplied by the trip count of each while loop around it (read from the loop's
condition: `i < constant`, the induction variable starting at 0 and stepping by 1, which is
how XLA lowers `scan` and `fori_loop`). A loop whose bound cannot be read counts once and is
reported.
"""

from __future__ import annotations

import dataclasses
import math
import re

_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_SHAPE = re.compile(r"^([a-z]+\d*)\[([\d,]*)\]")
_OPCODE = re.compile(r"\s([a-z][a-z\-]*)\((.*)$")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONSTANT = re.compile(r"^s32\[\]\S* constant\((\d+)\)")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: tuple[int, ...] | None
    opcode: str
    rest: str


def _parse(text: str) -> tuple[dict[str, list[Instruction]], str | None]:
    computations: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        instr = _INSTR.match(line)
        if instr is None or current is None:
            continue
        name, body = instr.groups()
        shape_match = _SHAPE.match(body)
        shape = tuple(int(d) for d in shape_match.group(2).split(",") if d) if shape_match else None
        op = _OPCODE.search(body[shape_match.end():] if shape_match else body)
        if op is None:
            continue
        computations[current].append(Instruction(name, shape, op.group(1), op.group(2)))
    return computations, entry


def _operands(rest: str) -> list[str]:
    depth, out, token = 0, [], ""
    for ch in rest:
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                break
            depth -= 1
        token += ch
    for part in token.split(","):
        found = re.search(r"%([\w.\-]+)", part)
        if found:
            out.append(found.group(1))
    return out


def _dims(rest: str, key: str) -> list[int]:
    found = re.search(key + r"=\{([\d,]*)\}", rest)
    return [int(d) for d in found.group(1).split(",") if d] if found else []


def _taps(rest: str, lhs_shape: tuple[int, ...]) -> int:
    """Input elements a convolution's window meets per output and input feature. TPU writes matmuls as
    convolutions whose window mostly lands on padding or dilation holes: batch dims as spatial dims with
    `lhs_dilate` equal to the window (ceil(size / dilate) real taps), or a head dim as a window over an
    input of size 1 padded around it (1 real tap). Per spatial dim: min(ceil(size / dilate), input size)."""
    window = re.search(r"window=\{([^}]*)\}", rest)
    labels = re.search(r"dim_labels=(\w+)_", rest)
    if window is None or labels is None:
        return 1
    size = re.search(r"size=([\dx]+)", window.group(1))
    dilate = re.search(r"lhs_dilate=([\dx]+)", window.group(1))
    sizes = [int(v) for v in size.group(1).split("x")] if size else []
    dilations = [int(v) for v in dilate.group(1).split("x")] if dilate else [1] * len(sizes)
    lhs = labels.group(1)
    inputs = [lhs_shape[lhs.index(str(k))] if str(k) in lhs and lhs.index(str(k)) < len(lhs_shape) else s
              for k, s in enumerate(sizes)]
    return math.prod(min(-(-s // d), n) for s, d, n in zip(sizes, dilations, inputs))


def _own_flops(instrs: list[Instruction]) -> float:
    shapes = {i.name: i.shape for i in instrs}
    total = 0.0
    for i in instrs:
        if i.shape is None or i.opcode not in ("dot", "convolution"):
            continue
        ops = _operands(i.rest)
        if len(ops) < 2 or shapes.get(ops[0]) is None or shapes.get(ops[1]) is None:
            continue
        out = math.prod(i.shape)
        if i.opcode == "dot":
            lhs = shapes[ops[0]]
            total += 2.0 * out * math.prod(lhs[d] for d in _dims(i.rest, "lhs_contracting_dims"))
        else:
            labels = re.search(r"dim_labels=\w+_(\w+)->", i.rest)
            kernel = shapes[ops[1]]
            if labels is None or len(labels.group(1)) != len(kernel):
                continue
            total += 2.0 * out * kernel[labels.group(1).index("i")] * _taps(i.rest, shapes[ops[0]])
    return total


def _trip_count(computations: dict[str, list[Instruction]], condition: str) -> int | None:
    """The bound of `i < N` in a while condition (constants in it or in computations it calls)."""
    seen, stack, bounds = set(), [condition], []
    while stack:
        name = stack.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for i in computations[name]:
            if i.opcode == "constant" and i.shape == ():
                value = re.match(r"(\d+)\)", i.rest)
                if value:
                    bounds.append(int(value.group(1)))
            stack += [c for _, c in _CALLS.findall(i.rest)]
    bounds = [b for b in bounds if b > 1]
    return max(bounds) if bounds else None


@dataclasses.dataclass
class Count:
    flops: float  # every loop body times its trip count
    flops_once: float  # each body once, as cost_analysis counts
    loops: list[tuple[str, int | None]]  # (while body, trip count or None when unread)


def count(text: str) -> Count:
    """Matmul FLOPs of one device's program in optimised HLO text."""
    computations, entry = _parse(text)
    if entry is None:
        return Count(0.0, 0.0, [])
    memo: dict[tuple[str, bool], float] = {}
    loops: list[tuple[str, int | None]] = []

    def flops(name: str, with_trips: bool) -> float:
        key = (name, with_trips)
        if key in memo:
            return memo[key]
        memo[key] = 0.0  # recursion guard
        instrs = computations.get(name, [])
        total = _own_flops(instrs)
        for i in instrs:
            called = dict((k, v) for k, v in _CALLS.findall(i.rest))
            if i.opcode == "while" and "body" in called:
                trips = _trip_count(computations, called.get("condition", ""))
                if with_trips:
                    loops.append((called["body"], trips))
                total += (trips or 1 if with_trips else 1) * flops(called["body"], with_trips)
            elif i.opcode == "conditional":
                branches = re.findall(r"%([\w.\-]+)", (_BRANCHES.search(i.rest) or re.search("()", "")).group(1))
                branches += [called[k] for k in ("true_computation", "false_computation") if k in called]
                total += max((flops(b, with_trips) for b in branches), default=0.0)
            elif "calls" in called:
                total += flops(called["calls"], with_trips)
        memo[key] = total
        return total

    return Count(flops(entry, True), flops(entry, False), loops)

"""What a compiled XLA program moves: collective bytes and an estimate of memory traffic, read from its HLO text
(``compiled.as_text()``), with loops counted as many times as they run.

XLA's own ``cost_analysis`` counts every loop body once; a decode loop runs once per generated token and a
``scan`` over layers once per layer, so this module walks the program itself. ``program_stats(text)`` returns
a ``ProgramStats``: what runs outside any loop (``outside``) and, for each outermost ``while`` loop, what one
trip of its body costs (``loops``, nested loops already multiplied in). ``ProgramStats.total(unknown_trips)``
is the whole run: ``outside + Σ_loops per_trip × trips``.

How bytes are counted (all per device: the compiled program is one device's SPMD program):

- **Collectives** (``all-gather``, ``all-reduce``, ``reduce-scatter``, ``all-to-all``, ``collective-permute``,
  also in their ``-start`` forms and inside the fusions TPU wraps them in): the bytes of the larger of the
  op's operands and its results, i.e. the full array of the collective: the gathered result of an all-gather,
  the unreduced input of a reduce-scatter, the array of the others. (A ring all-gather over n devices sends
  ``(n-1)/n`` of it per device; an all-reduce, a reduce-scatter then an all-gather, twice that.) Where a
  ``-start`` op's result tuple also holds its operands, they are subtracted first.
- **Memory traffic** (``hbm_bytes``): for every instruction outside a fusion, the bytes of its operands and
  results that live in HBM (memory space 0; a TPU layout's ``S(1)`` is on-chip memory and is not counted), a
  fusion counted as one instruction (what it reads and writes, not its insides). Bookkeeping ops (parameters,
  tuples, bitcasts, constants, loop and call shells, the ``-done`` half of an asynchronous op) cost nothing; an
  asynchronous ``-start`` op (a copy or slice between memory spaces, a collective) reads at most what it moves
  and writes its results. A dynamic-update-slice, alone or as a fusion's root, updates its buffer in place: it
  counts the update, not the buffer; a fusion operand the fusion only slices (a ``scan`` body's layer of
  stacked weights or KV cache) counts the slices. ``cost_analysis``' 'bytes accessed' counts on-chip traffic
  too, and every loop body once.
- **Loops**: a ``while`` with a known trip count (``known_trip_count`` in its backend config: ``scan``,
  ``fori_loop``) is multiplied by it wherever it is nested; an outermost loop with a trip count the compiler
  does not know (a decode loop that exits on EOS) is reported per trip, and ``total`` takes its trips from the
  caller. A conditional counts its most expensive branch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

# Bytes per element of each HLO element type (sub-byte types rounded up to a byte).
_DTYPE_BYTES = {"pred": 1, "token": 0, "opaque": 0}
_DTYPE_BYTES.update({f"{p}{b}": max(b // 8, 1) for p in "suf" for b in (2, 4, 8, 16, 32, 64)})
_DTYPE_BYTES.update({"bf16": 2, "c64": 8, "c128": 16})
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([^\]]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9][0-9]*\)")  # a layout's memory space other than 0 (HBM): on-chip memory
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\((.*)\)\s+->\s+(.*)\{\s*$")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# Instructions that move no data of their own (or whose cost is their called computations').
_FREE = {
    "parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "conditional", "call",
    "after-all", "partition-id", "replica-id", "opt-barrier", "domain", "add-dependency", "async-done",
    "async-update", "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done",
}  # fmt: skip


def shape_bytes(shape: str, hbm_only: bool = False) -> int:
    """Bytes of an HLO shape string: an array (``bf16[4,128]{1,0:T(8,128)}``) or a tuple of them; with
    ``hbm_only``, only the arrays in memory space 0 (a TPU layout's ``S(1)`` marks on-chip memory)."""
    total = 0
    for dtype, dims, layout in _ARRAY.findall(shape):
        if dtype not in _DTYPE_BYTES or (hbm_only and _ON_CHIP.search(layout)):
            continue
        n = 1
        for d in dims.replace("<=", "").split(","):
            n *= int(d) if d.strip() else 1
        total += n * _DTYPE_BYTES[dtype]
    return total


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]  # operand names (without %)
    operand_shapes: list[str | None]  # shapes printed inline with the operands, where the printer gives them
    attrs: str  # the rest of the line after the operand list


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]
    shapes: dict[str, str]  # every value's shape: parameters and instructions
    root: Instr | None


def _close(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at ``start``."""
    depth, pairs = 0, {"(": ")", "{": "}", "[": "]"}
    for i in range(start, len(text)):
        if text[i] in pairs:
            depth += 1
        elif text[i] in ")}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside any brackets."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def _parse_instr(line: str) -> Instr | None:
    body = line.strip().removeprefix("ROOT ").strip()
    if " = " not in body:
        return None
    name, rest = body.split(" = ", 1)
    end = _close(rest, 0) if rest.startswith("(") else rest.index(" ") if " " in rest else len(rest)
    shape, rest = rest[:end], rest[end:].strip()
    paren = rest.find("(")
    if paren <= 0:
        return None
    opcode, stop = rest[:paren], _close(rest, paren)
    names, shapes = [], []
    for operand in _split_top(rest[paren + 1 : stop - 1]):
        parts = operand.rsplit(" ", 1)
        names.append(parts[-1].lstrip("%"))
        shapes.append(parts[0] if len(parts) == 2 else None)
    return Instr(name.lstrip("%"), shape, opcode, names, shapes, rest[stop:])


def parse(text: str) -> tuple[dict[str, Computation], str]:
    """The computations of an HLO module's text, by name, and the entry computation's name."""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = Computation(header.group(1), [], {}, None)
            comps[current.name] = current
            for param in _split_top(header.group(2)):
                if ":" in param:
                    pname, pshape = param.split(":", 1)
                    current.shapes[pname.strip().lstrip("%")] = pshape.strip()
            entry = current.name if line.startswith("ENTRY") else entry
            continue
        if current is None or line.startswith("}"):
            current = None if line.startswith("}") else current
            continue
        instr = _parse_instr(line)
        if instr is None:
            continue
        current.instrs.append(instr)
        current.shapes[instr.name] = instr.shape
        if line.strip().startswith("ROOT "):
            current.root = instr
    return comps, entry


def called(instr: Instr) -> list[str]:
    """The computations an instruction calls (fusion, call, while body and condition, branches, reducers)."""
    names = _CALLED.findall(instr.attrs)
    for group in _CALLED_LIST.findall(instr.attrs):
        names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
    return names


@dataclasses.dataclass
class Cost:
    """Bytes per device: collectives by op kind, and the memory-traffic estimate."""

    collectives: dict[str, float] = dataclasses.field(default_factory=dict)
    hbm_bytes: float = 0.0

    def add(self, other: Cost, times: float = 1.0) -> None:
        for kind, b in other.collectives.items():
            self.collectives[kind] = self.collectives.get(kind, 0.0) + b * times
        self.hbm_bytes += other.hbm_bytes * times

    @property
    def collective_bytes(self) -> float:
        return sum(self.collectives.values())

    def as_dict(self) -> dict:
        total = self.collective_bytes
        return {"collectives": dict(self.collectives), "collective_bytes": total, "hbm_bytes": self.hbm_bytes}


@dataclasses.dataclass
class Loop:
    """An outermost ``while`` loop: its name, trip count (None: not known to the compiler) and one trip's cost."""

    name: str
    trips: int | None
    per_trip: Cost


@dataclasses.dataclass
class ProgramStats:
    outside: Cost  # everything that is not inside an outermost while loop
    loops: list[Loop]

    def total(self, unknown_trips: float = 1.0) -> Cost:
        """The whole run: ``outside + Σ per_trip × trips``, a loop of unknown trip count run ``unknown_trips``
        times (for ``generate``'s decode segments: ``max_new_tokens / len(segments)`` each)."""
        out = Cost()
        out.add(self.outside)
        for loop in self.loops:
            out.add(loop.per_trip, loop.trips if loop.trips is not None else unknown_trips)
        return out

    def unknown_trip_loops(self) -> list[Loop]:
        return [loop for loop in self.loops if loop.trips is None]

    def as_dict(self) -> dict:
        loops = [{"name": lp.name, "trips": lp.trips, **lp.per_trip.as_dict()} for lp in self.loops]
        return {"outside": self.outside.as_dict(), "loops": loops}


def _collective_kind(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    return base if base in COLLECTIVES else None


def _operand_bytes(comp: Computation, instr: Instr, skip: Iterable[int] = (), hbm_only: bool = False) -> int:
    total = 0
    for i, (name, shape) in enumerate(zip(instr.operands, instr.operand_shapes, strict=True)):
        if i not in skip:
            total += shape_bytes(shape if shape is not None else comp.shapes.get(name, ""), hbm_only)
    return total


def _collective_bytes(comp: Computation, instr: Instr) -> int:
    operands, result = _operand_bytes(comp, instr), shape_bytes(instr.shape)
    if instr.opcode.endswith("-start") and instr.shape.startswith("("):  # (operands, results, contexts)
        result = max(result - operands, 0)
    return max(operands, result)


class _Walker:
    def __init__(self, comps: dict[str, Computation]):
        self.comps = comps
        self.memo: dict[str, Cost] = {}
        self.slices: dict[str, dict[int, int]] = {}

    def collectives_of(self, name: str) -> Cost:
        """Collectives anywhere under a fusion's computation (TPU wraps async collectives in fusions)."""
        out = Cost()
        for instr in self.comps[name].instrs if name in self.comps else []:
            if kind := _collective_kind(instr.opcode):
                out.collectives[kind] = out.collectives.get(kind, 0.0) + _collective_bytes(self.comps[name], instr)
            for sub in called(instr):
                out.add(Cost(self.collectives_of(sub).collectives))
        return out

    def cost(self, name: str) -> Cost:
        """One run of computation ``name``, with every loop inside it multiplied by its known trip count."""
        if name in self.memo:
            return self.memo[name]
        out = Cost()
        comp = self.comps.get(name)
        for instr in comp.instrs if comp else []:
            out.add(self.instr_cost(comp, instr))
        self.memo[name] = out
        return out

    def trips(self, instr: Instr) -> int | None:
        """A while loop's trip count: the compiler's ``known_trip_count`` (CPU prints it), else a condition that
        is ``counter < constant`` (TPU's compiled ``scan``; the counter of a scan starts at 0 and steps by 1)."""
        if known := _TRIPS.search(instr.attrs):
            return int(known.group(1))
        cond = self.comps.get(m.group(1)) if (m := re.search(r"\bcondition=%([\w.\-]+)", instr.attrs)) else None
        root = cond.root if cond else None
        if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs:
            return None
        limit = next((i for i in cond.instrs if i.name == root.operands[1]), None)
        if limit is None or limit.opcode != "constant" or not limit.operands[0].lstrip("-").isdigit():
            return None
        return int(limit.operands[0])

    def instr_cost(self, comp: Computation, instr: Instr) -> Cost:
        out = Cost()
        subs = called(instr)
        if instr.opcode == "while":
            for sub in subs:
                out.add(self.cost(sub), self.trips(instr) or 1)
            return out
        if instr.opcode == "conditional":
            branches = [self.cost(s) for s in subs]
            return max(branches, key=lambda c: (c.collective_bytes, c.hbm_bytes)) if branches else out
        if instr.opcode in ("call", "async-start"):
            for sub in subs:
                out.add(self.cost(sub))
            return out
        if kind := _collective_kind(instr.opcode):
            out.collectives[kind] = float(_collective_bytes(comp, instr))
        elif instr.opcode == "fusion":
            for sub in subs:
                out.add(Cost(self.collectives_of(sub).collectives))
        if instr.opcode not in _FREE and not instr.opcode.endswith("-done"):
            out.hbm_bytes = float(self.traffic(comp, instr))
        return out

    def sliced_reads(self, fused_name: str) -> dict[int, int]:
        """For a fused computation: ``{parameter number: bytes}`` of the parameters it only slices (through
        bitcasts): it reads those slices, not the whole operand (a ``scan`` body's layer of the stacked weights
        and KV cache)."""
        if fused_name in self.slices:
            return self.slices[fused_name]
        fused = self.comps.get(fused_name)
        users: dict[str, list[Instr]] = {}
        for i in fused.instrs if fused else []:
            for name in i.operands:
                users.setdefault(name, []).append(i)

        def slice_bytes(name: str, depth: int = 0) -> int | None:
            total = 0
            for user in users.get(name, []):
                if user.opcode in ("dynamic-slice", "slice") and user.operands[0] == name:
                    total += shape_bytes(user.shape)
                elif user.opcode == "bitcast" and depth < 4:
                    inner = slice_bytes(user.name, depth + 1)
                    if inner is None:
                        return None
                    total += inner
                elif user.opcode == "fusion" and (subs := called(user)):  # a nested fusion that slices it
                    nested = self.sliced_reads(subs[0])
                    positions = [k for k, operand in enumerate(user.operands) if operand == name]
                    if any(k not in nested for k in positions):
                        return None
                    total += sum(nested[k] for k in positions)
                else:
                    return None
            return total or None

        out = {}
        for i in fused.instrs if fused else []:
            numbered = i.opcode == "parameter" and i.operands and i.operands[0].isdigit()
            if numbered and (b := slice_bytes(i.name)) is not None:
                out[int(i.operands[0])] = b
        self.slices[fused_name] = out
        return out

    def traffic(self, comp: Computation, instr: Instr) -> int:
        """HBM bytes an instruction reads and writes (arrays in on-chip memory spaces excluded)."""
        shapes = zip(instr.operands, instr.operand_shapes, strict=True)
        hbm = [shape_bytes(sh or comp.shapes.get(n, ""), hbm_only=True) for n, sh in shapes]
        writes = shape_bytes(instr.shape, hbm_only=True)
        if instr.opcode.endswith("-start") and instr.shape.startswith("("):  # (operands, results, contexts)
            # An asynchronous move (a copy or slice between memory spaces, a collective): it reads at most what
            # it moves (a slice reads part of its operand) and writes the results that are not its operands.
            moved = shape_bytes(instr.shape) - _operand_bytes(comp, instr)
            return min(sum(hbm), moved) + max(writes - sum(hbm), 0)
        if instr.opcode == "dynamic-update-slice":  # in place: reads the update, writes it into the buffer
            return sum(hbm[1:]) + min(writes, hbm[1] if len(hbm) > 1 else 0)
        fused = self.comps.get(called(instr)[0]) if instr.opcode == "fusion" and called(instr) else None
        if fused is None:
            return sum(hbm) + writes
        for index, sliced in self.sliced_reads(fused.name).items():
            if index < len(hbm):
                hbm[index] = min(hbm[index], sliced)
        root = fused.root
        if root is not None and root.opcode == "dynamic-update-slice":  # the buffer is updated in place
            params = {i.name: int(i.operands[0]) for i in fused.instrs if i.opcode == "parameter"}
            if (buffer := params.get(root.operands[0])) is not None and buffer < len(hbm):
                hbm[buffer] = 0
            writes = min(writes, shape_bytes(fused.shapes.get(root.operands[1], "")))
        return sum(hbm) + writes


def program_stats(text: str) -> ProgramStats:
    """Collective bytes and memory traffic of a compiled program's HLO text (see the module docstring)."""
    comps, entry = parse(text)
    walker = _Walker(comps)
    outside, loops = Cost(), []

    def visit(name: str) -> None:  # outside any loop: record outermost loops, descend into calls
        comp = comps[name]
        for instr in comp.instrs:
            if instr.opcode == "while":
                per_trip = Cost()
                for sub in called(instr):
                    per_trip.add(walker.cost(sub))
                loops.append(Loop(instr.name, walker.trips(instr), per_trip))
            elif instr.opcode in ("call", "async-start"):
                for sub in called(instr):
                    visit(sub)
            else:
                outside.add(walker.instr_cost(comp, instr))

    visit(entry)
    return ProgramStats(outside, loops)


def decode_step_bytes(stats: ProgramStats) -> dict[str, float]:
    """Collective bytes per decode step by kind: one trip of the largest outermost loop whose trip count is not
    known at compile time (``sampling.generate``'s decode segments; they differ only in their cache's size)."""
    loops = stats.unknown_trip_loops()
    if not loops:
        return {}
    return dict(max(loops, key=lambda lp: lp.per_trip.collective_bytes).per_trip.collectives)

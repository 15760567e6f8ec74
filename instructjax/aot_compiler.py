"""Compiling one program ahead of time for a TPU slice described by libtpu, and what it costs per device:
the slice (``topology``), the compiler's memory plan and FLOPs of a traced program (``compile_program``,
``Program``, ``dot_flops``) and the report's forms (``report_dict``, ``format_table``). ``aot.py`` builds the
programs of a training config and compiles them with these.

Per-device figures: ``arguments + outputs - aliased (donated) + temporaries + generated code (+ resident)`` =
``total``, against the chip's HBM. A program whose temporaries alone exceed HBM is refused by the compiler
(``RESOURCE_EXHAUSTED``): it is reported as not fitting, with the temporaries the compiler asked for.

FLOPs. XLA's ``cost_analysis`` counts every loop body once: with ``scan_layers`` that is one layer of the
stack, one chunk of the fused LM loss, one decode step (``xla_flops``, kept for reference). ``flops`` counts
the matmuls of the traced program instead, each ``scan`` body times its length, the decode loop at its
longest (``max_new_tokens`` steps), backward pass and remat recomputation included (``dot_flops``);
``model_flops`` is the analytic training count (``metrics.training_flops_per_token`` x tokens: 6 N per token
plus attention, no recomputation), what MFU uses. All per device.

Collectives and memory traffic come from the compiled program's HLO (``hlo_stats``), loops counted as they run;
``tpu_predict.predict`` turns the three counts into a PREDICTED time per chip at its published peaks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
import re
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from instructjax import hlo_stats, sharding, tpu_predict

GiB = 1024**3

# HBM per chip in GiB, from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e): v4 32 GiB HBM2, v5e 16 GiB HBM2, v5p 95 GiB HBM2e, v6e (Trillium) 32 GiB. The compiler keeps
# a little of it for itself, so a total close to the limit is not a guaranteed fit.
HBM_GIB_PER_CHIP = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Where ``compile_program`` writes each compiled program's HLO text (``scripts/aot_compile.py --hlo_dir``), so
# that ``hlo_stats`` can be rerun on it without compiling again; None: nowhere.
HLO_DIR: str | None = None
# jax device_kind of each family (what libtpu's topology devices report).
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice described by libtpu: its devices (one per chip, or per core where libtpu lists cores)."""

    name: str  # e.g. "v5e:4x4"
    family: str  # v4, v5e, v5p, v6e
    devices: tuple
    chips: int
    hbm_bytes_per_device: int


@dataclasses.dataclass
class Program:
    """One compiled program's per-device memory plan and FLOPs."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    resident_bytes: int  # persistent arrays on the chips that are not this program's arguments (PPO)
    flops: float  # matmul FLOPs per device counted on the traced program, loops x trip count (``dot_flops``)
    xla_flops: float  # XLA's count per device of the compiled program (every loop body once)
    model_flops: float | None  # analytic training FLOPs per device (None: not a training program)
    compile_seconds: float  # trace + lower + compile
    # hlo_stats of the compiled program, per device, the decode loop at its longest (``while_trips`` steps):
    collectives: dict = dataclasses.field(default_factory=dict)  # collective bytes of the whole run, by kind
    decode_step_collective_bytes: float = 0.0  # one trip of the decode loop (0: no such loop)
    hbm_bytes: float = 0.0  # memory traffic of the whole run (hlo_stats' estimate)
    xla_bytes: float = 0.0  # cost_analysis' 'bytes accessed' (every loop body once)
    error: str = ""  # the compiler's out-of-memory message when it refused the program (then temp_bytes is its need)

    @property
    def total_bytes(self) -> int:
        out = self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
        return out + self.resident_bytes


def _compile_only_libtpu() -> None:
    """Where no TPU is attached, libtpu is only a compiler here. It asks the TPU VM metadata for the accelerator
    type and worker hostnames and warns when there is none: a local answer silences that (the topology compiled
    for is named explicitly, so these values do not enter the compilation). It also takes a machine-wide lock
    (/tmp/libtpu_lockfile) that would stop a second process, e.g. a test beside a running compile:
    ALLOW_MULTIPLE_LIBTPU_LOAD lifts it, as there is no device to share. All left alone where a TPU is attached."""
    if any(pathlib.Path("/dev").glob("accel*")) or pathlib.Path("/dev/vfio").exists():
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology(name: str) -> Topology:
    """The slice ``name`` (``<family>:<chips per dimension>``, e.g. ``v5e:2x2``, ``v5p:2x2x1``); errors name
    the problem: an unknown family, a shape libtpu rejects, or libtpu missing."""
    family = name.split(":", 1)[0]
    if ":" not in name or family not in HBM_GIB_PER_CHIP:
        raise ValueError(
            f"unknown TPU topology {name!r}: expected <family>:<shape> with family one of "
            f"{sorted(HBM_GIB_PER_CHIP)}, e.g. v5e:2x2, v5e:4x4, v5e:8x8, v5p:2x2x1, v5p:2x2x2, v4:2x2x1, v6e:4x4"
        )
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(
            "ahead-of-time compilation for TPU needs libtpu (the TPU compiler), which is not installed: "
            "pip install -e '.[tpu]'"
        )
    _compile_only_libtpu()
    sharding.set_tpu_flags()  # what a TPU run compiles with (scripts/train_*.py)
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu's own message says what is wrong with the shape
        raise ValueError(f"libtpu rejects TPU topology {name!r}: {e}") from e
    devices = tuple(desc.devices)
    kind = _DEVICE_KINDS.get(devices[0].device_kind)
    if kind != family:
        raise ValueError(f"topology {name!r} gave {devices[0].device_kind!r} devices, not {family}")
    chips = len({tuple(d.coords) for d in devices})  # v4 lists both cores of a chip as devices
    hbm = HBM_GIB_PER_CHIP[family] * GiB * chips // len(devices)
    return Topology(name, family, devices, chips, hbm)


# ----------------------------------------------------------------------------------------------- helpers


def abstract_arrays(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes, shardings)


def abstract_batch(mesh, rules, spec: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract global batch arrays, batch axis sharded as ``sharding.to_global`` shards them."""
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, rules, len(shape)))
        for k, (shape, dtype) in spec.items()
    }


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct``s (unpadded)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            total += 8 * math.prod(shard)  # a threefry key is 2 x uint32
        else:
            total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


def _subjaxprs(eqn) -> list:
    out = []
    for value in eqn.params.values():
        for x in value if isinstance(value, list | tuple) else [value]:
            if hasattr(x, "eqns"):
                out.append(x)
            elif hasattr(getattr(x, "jaxpr", None), "eqns"):
                out.append(x.jaxpr)
    return out


def dot_flops(jaxpr: Any, while_trips: int = 1) -> float:
    """Matmul FLOPs (2 per multiply-add of every ``dot_general``) of a jaxpr, with each ``scan`` body counted
    ``length`` times, each ``while`` body ``while_trips`` times (the decode loop: its longest run) and the
    larger ``cond`` branch. The backward pass and remat's recomputation are in the jaxpr of a train step, so
    they are counted; elementwise work is not."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
            total += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)
            continue
        subs = _subjaxprs(eqn)
        if not subs:
            continue
        if name == "cond":
            total += max(dot_flops(b, while_trips) for b in subs)
            continue
        times = eqn.params["length"] if name == "scan" else while_trips if name == "while" else 1
        total += times * sum(dot_flops(sub, while_trips) for sub in subs)
    return total


def outer_whiles(jaxpr: Any) -> int:
    """How many ``while`` loops a jaxpr has that are not inside another one (``generate``'s decode segments)."""
    inner = lambda eqn: sum(outer_whiles(sub) for sub in _subjaxprs(eqn))
    return sum(1 if eqn.primitive.name == "while" else inner(eqn) for eqn in jaxpr.eqns)


def trace_in_mesh(trace, mesh, rules):
    """``trace()`` under the mesh and logical rules, as the training loop runs (``sharding.use``): the model's
    activation sharding constraints apply. (Nothing may execute in there: the mesh's devices are abstract.)"""
    with sharding.use(mesh, rules):
        return trace()


def compile_program(name: str, trace, args, mesh, rules, *, resident=0, model_flops=None, while_trips=1, log=None):
    """Trace (``trace()`` returns a ``jax.stages.Traced`` of ``args``), count, lower and compile;
    ``(Program, compiled)``, ``compiled`` None when the compiler refused the program for lack of HBM."""
    if log:
        log(f"[aot] compiling {name} ...")
    start = time.perf_counter()
    with sharding.use(mesh, rules):
        traced = trace()
        # ``while_trips`` steps in all, shared by the decode segments (each its own while loop)
        segments = max(outer_whiles(traced.jaxpr.jaxpr), 1)
        flops = dot_flops(traced.jaxpr.jaxpr, while_trips / segments) / mesh.size
        try:
            compiled = traced.lower().compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program whose temporaries exceed HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            seconds = time.perf_counter() - start
            return _refused(name, str(e), args, resident, flops, model_flops, seconds, log), None
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    text = compiled.as_text()
    if HLO_DIR:
        pathlib.Path(HLO_DIR).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(HLO_DIR) / (re.sub(r"\W+", "_", name).strip("_") + ".hlo.txt")).write_text(text)
    stats = hlo_stats.program_stats(text)
    decode = stats.unknown_trip_loops()  # generate's decode segments share its max_new_tokens steps
    run = stats.total(while_trips / len(decode) if decode else 1)
    program = Program(
        name=name,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        resident_bytes=int(resident),
        flops=flops,
        xla_flops=float((cost or {}).get("flops", 0.0)),
        model_flops=model_flops,
        compile_seconds=seconds,
        collectives=run.collectives,
        decode_step_collective_bytes=sum(hlo_stats.decode_step_bytes(stats).values()),
        hbm_bytes=run.hbm_bytes,
        xla_bytes=float((cost or {}).get("bytes accessed", 0.0)),
    )
    if log:
        log(f"[aot]   {name}: {program.total_bytes / GiB:.2f} GiB per device, compiled in {seconds:.0f} s")
    return program, compiled


def _refused(name, message, args, resident, flops, model_flops, seconds, log) -> Program:
    """A program the compiler refused for lack of HBM: its arguments (from their shardings) and the temporaries
    the message names; a row that does not fit, with the reason."""
    need = re.search(r"HLO temporaries \(([0-9.]+)([KMGT])\)", message)
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    temps = int(float(need.group(1)) * scale[need.group(2)]) if need else 0
    reason = message.split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
    if log:
        log(f"[aot]   {name}: refused by the compiler: {reason}")
    arg_bytes = bytes_per_device(args)
    return Program(name, arg_bytes, 0, 0, temps, 0, int(resident), flops, 0.0, model_flops, seconds, error=reason)


def compiled_outputs(compiled) -> Any:
    """The compiled program's outputs as abstract arrays with the shardings it produces them in."""
    return jax.tree.map(
        lambda info, sh: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sh),
        compiled.out_info,
        compiled.output_shardings,
    )


def batch_sharded_outputs(traced, mesh, rules) -> Any:
    """A traced program's outputs as abstract arrays sharded along the batch (scalars replicated): the rollout
    shapes when only the update is compiled (compiling the rollout gives the compiler's own choice)."""

    def one(info):
        spec = sharding.batch_sharding(mesh, rules, info.ndim) if info.ndim else NamedSharding(mesh, P())
        return jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=spec)

    return jax.tree.map(one, traced.out_info)


# ----------------------------------------------------------------------------------------------- prediction


def program_prediction(p: Program, family: str, chips: int, devices: int) -> dict:
    """``predict`` for a compiled program: its matmul FLOPs (``dot_flops``, loops counted), the memory traffic
    and collective bytes of ``hlo_stats``; MFU from the model FLOPs where the program has them (training steps)."""
    if p.error:
        return {}
    peaks = tpu_predict.device_peaks(family, chips, devices)
    return tpu_predict.predict(p.flops, p.hbm_bytes, p.collectives, peaks, p.model_flops)


# ----------------------------------------------------------------------------------------------- the report


def report_dict(report: dict[str, Any]) -> dict[str, Any]:
    """The report as plain JSON data (bytes per device, FLOPs per device)."""
    hbm = report["hbm_bytes_per_device"]
    out = {k: v for k, v in report.items() if k != "programs"}
    out["programs"] = [
        {
            **{k: v for k, v in dataclasses.asdict(p).items()},
            "total_bytes": p.total_bytes,
            "headroom_bytes": hbm - p.total_bytes,
            "fits": p.total_bytes <= hbm and not p.error,
            "prediction": program_prediction(p, report["family"], report["chips"], report["devices"]),
        }
        for p in report["programs"]
    ]
    out["fits"] = all(p["fits"] for p in out["programs"])
    return out


def format_table(report: dict[str, Any], label: str = "") -> str:
    """The human-readable per-device table."""
    hbm = report["hbm_bytes_per_device"]
    gib = lambda x: f"{x / GiB:.2f}"
    head = (
        f"{label + ' ' if label else ''}on {report['topology']} ({report['chips']} chips, {report['devices']} devices, "
        f"mesh {report['mesh']}); per device, GiB; HBM {gib(hbm)} GiB"
    )
    cols = (
        "program",
        "args",
        "outputs",
        "aliased",
        "temps",
        "code",
        "resident",
        "total",
        "headroom",
        "fits",
        "TFLOPs",
        "XLA TFLOPs",
        "model TFLOPs",
        "coll GB",
        "step coll MB",
        "pred s",
        "bound",
        "pred MFU",
        "compile s",
    )
    rows, fam = [], (report["family"], report["chips"], report["devices"])
    for p in report["programs"]:
        rows.append(
            (
                p.name,
                gib(p.argument_bytes),
                gib(p.output_bytes),
                gib(p.alias_bytes),
                gib(p.temp_bytes),
                gib(p.code_bytes),
                gib(p.resident_bytes),
                gib(p.total_bytes),
                gib(hbm - p.total_bytes),
                "yes" if p.total_bytes <= hbm and not p.error else "NO",
                f"{p.flops / 1e12:.2f}",
                f"{p.xla_flops / 1e12:.2f}",
                "-" if p.model_flops is None else f"{p.model_flops / 1e12:.2f}",
                f"{sum(p.collectives.values()) / 1e9:.2f}",
                f"{p.decode_step_collective_bytes / 1e6:.1f}",
                f"{pred['seconds']:.3g}" if (pred := program_prediction(p, *fam)) else "-",
                pred.get("bound", "-"),
                f"{pred['mfu']:.0%}" if pred else "-",
                f"{p.compile_seconds:.0f}",
            )
        )
    widths = [max(len(str(r[i])) for r in (cols, *rows)) for i in range(len(cols))]

    def line(r):
        cells = [str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True))]
        return "  ".join(cells)

    notes = [f"{p.name}: refused by the XLA TPU compiler: {p.error}" for p in report["programs"] if p.error]
    notes.append("pred s, bound, pred MFU: a PREDICTION from the compiled program's counts at the chip's peaks")
    return "\n".join([head, line(cols), *(line(r) for r in rows), *notes])

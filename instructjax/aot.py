"""Ahead-of-time compilation for a TPU slice on a machine without a TPU: does a config compile, and fit in HBM?

    python scripts/aot_compile.py --config=configs/tpu.py:sft_1p3b --topology=v5e:4x4 [--what=all]

With ``libtpu`` installed (``pip install -e '.[tpu]'``), ``jax.experimental.topologies`` describes a TPU
slice (``v5e:4x4``: 16 TPU v5e chips) without the hardware; a mesh over its devices, abstract inputs
(``jax.ShapeDtypeStruct`` with the training run's shardings) and ``jax.jit(...).trace(...).lower().compile()``
give the XLA TPU compiler's own per-chip memory plan (``memory_analysis``). Nothing runs on a TPU and no data
is read: batches are abstract arrays of the shapes the data pipeline produces (``pipeline.py``'s batch
conventions).

The programs compiled are the ones training runs, built by the same functions:

- SFT / pretraining (``config.stage`` 'sft' or 'pretrain'): ``steps.make_train_step`` and ``make_eval_step``
  over ``train_sft.make_loss_fn``; batch ``tokens, mask, loss_mask [B,T]``, ``row_valid [B]`` (+ ``segment_ids``
  for packed pretraining, + the ``ptx_*`` rows of ``data.ptx_fraction``, ``train_sft.ptx_rows_per_step``).
- RM ('rm'): the same over ``train_rm.make_loss_fn``; batch ``tokens, mask [B,K,T]``, ``valid [B,K]``,
  ``pair_mask [B,K,K]``, ``row_valid [B]``.
- PPO ('ppo'): ``train_step`` is ``train_ppo.make_update`` (one minibatch: policy + value Adam steps, and
  the ptx term on ``train_ppo.ptx_rows_per_minibatch`` pretraining rows); ``rollout`` is the program of
  ``sampling.generate`` (prefill + decode loop over the KV cache) for ``batch_size`` prompts of
  ``data.max_prompt_len`` tokens, and ``train_ppo.make_score`` (``rollout.score`` + ``finish``). Each takes the
  previous one's output shapes and shardings, as in an iteration.

PPO keeps four parameter sets on the chips the whole time, but each program takes only some of them as
arguments: the bytes of the others (e.g. both Adam states during generation) are added to its total as
``resident``, so "fits" means the whole iteration fits. The PPO models come from ``config.aot``
(``policy_model``, ``value_model``: what the ``policy_from``/``rm_from`` workdirs will hold; the TPU presets
set them), else from those workdirs' ``config.json``.

Per-device figures: ``arguments + outputs - aliased (donated) + temporaries + generated code (+ resident)`` =
``total``, against the chip's HBM. A program whose temporaries alone exceed HBM is refused by the compiler
(``RESOURCE_EXHAUSTED``): it is reported as not fitting, with the temporaries the compiler asked for.

FLOPs. XLA's ``cost_analysis`` counts every loop body once: with ``scan_layers`` that is one layer of the
stack, one chunk of the fused LM loss, one decode step (``xla_flops``, kept for reference). ``flops`` counts
the matmuls of the traced program instead, each ``scan`` body times its length, the decode loop at its
longest (``max_new_tokens`` steps), backward pass and remat recomputation included (``dot_flops``);
``model_flops`` is the analytic training count (``metrics.training_flops_per_token`` x tokens: 6 N per token
plus attention, no recomputation), what MFU uses. All per device.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from instructjax import metrics, optim, sampling, sharding, steps, train_ppo, train_rm, train_sft
from instructjax.model import ModelConfig, Transformer

GiB = 1024**3

# HBM per chip in GiB, from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e): v4 32 GiB HBM2, v5e 16 GiB HBM2, v5p 95 GiB HBM2e, v6e (Trillium) 32 GiB. The compiler keeps
# a little of it for itself, so a total close to the limit is not a guaranteed fit.
HBM_GIB_PER_CHIP = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# jax device_kind of each family (what libtpu's topology devices report).
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}
WHAT = ("train_step", "eval_step", "rollout", "all")


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


def _abstract(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes, shardings)


def _batch(mesh, rules, spec: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, jax.ShapeDtypeStruct]:
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


def _trace(trace, mesh, rules):
    """``trace()`` under the mesh and logical rules, as the training loop runs (``sharding.use``): the model's
    activation sharding constraints apply. (Nothing may execute in there: the mesh's devices are abstract.)"""
    with sharding.use(mesh, rules):
        return trace()


def _compile(name: str, trace, args, mesh, rules, *, resident=0, model_flops=None, while_trips=1, log=None):
    """Trace (``trace()`` returns a ``jax.stages.Traced`` of ``args``), count, lower and compile;
    ``(Program, compiled)``, ``compiled`` None when the compiler refused the program for lack of HBM."""
    if log:
        log(f"[aot] compiling {name} ...")
    start = time.perf_counter()
    with sharding.use(mesh, rules):
        traced = trace()
        flops = dot_flops(traced.jaxpr.jaxpr, while_trips) / mesh.size
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


def _outputs(compiled) -> Any:
    """The compiled program's outputs as abstract arrays with the shardings it produces them in."""
    return jax.tree.map(
        lambda info, sh: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sh),
        compiled.out_info,
        compiled.output_shardings,
    )


def _batch_sharded(traced, mesh, rules) -> Any:
    """A traced program's outputs as abstract arrays sharded along the batch (scalars replicated): the rollout
    shapes when only the update is compiled (compiling the rollout gives the compiler's own choice)."""

    def one(info):
        spec = sharding.batch_sharding(mesh, rules, info.ndim) if info.ndim else NamedSharding(mesh, P())
        return jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=spec)

    return jax.tree.map(one, traced.out_info)


def _model_flops(cfg: ModelConfig, rows: int, length: int, devices: int) -> float:
    return metrics.training_flops_per_token(cfg, length) * rows * length / devices


# ----------------------------------------------------------------------------------------------- stages


def _step_programs(config, cfg, loss_fn, train_spec, eval_spec, flops, mesh, rules, what, log) -> list[Program]:
    """The train step (``steps.make_train_step``, state donated) and the eval step (``steps.make_eval_step``,
    with the optimizer state resident beside it) of an SFT or RM config, for batches of ``*_spec`` shapes."""
    model = Transformer(cfg)
    tx = optim.make_optimizer(config.optim, config.num_steps or 1000)  # the schedule's length: no shapes
    example = np.zeros((1, config.data.max_len), np.int32)
    shapes, state_sh = steps.abstract_train_state(lambda r: model.init(r, example)["params"], tx, mesh, rules)
    state = _abstract(shapes, state_sh)
    programs = []
    if what in ("train_step", "all"):
        sharding.check_batch_size("config.batch_size", train_spec["row_valid"][0][0], mesh, rules)
        step = steps.make_train_step(loss_fn, tx, state_sh, config.nan_policy)
        batch = _batch(mesh, rules, train_spec)
        name = f"{config.stage} train_step"
        program, _ = _compile(name, lambda: step.trace(state, batch), (state, batch), mesh, rules, model_flops=flops,
                              log=log)  # fmt: skip
        programs.append(program)
    if what in ("eval_step", "all"):
        sharding.check_batch_size("config.eval_batch_size", eval_spec["row_valid"][0][0], mesh, rules)
        evaluate = steps.make_eval_step(loss_fn, state_sh.params)
        batch = _batch(mesh, rules, eval_spec)
        others = bytes_per_device((state.opt_state, state.step, state.rng))
        program, _ = _compile(f"{config.stage} eval_step", lambda: evaluate.trace(state.params, batch),
                              (state.params, batch), mesh, rules, resident=others, log=log)  # fmt: skip
        programs.append(program)
    return programs


def _sft_programs(config, mesh, rules, devices: int, what: str, log) -> list[Program]:
    cfg = ModelConfig.from_dict(config.model)

    def spec(b, ptx=0):  # pipeline.sft_batches / pretrain_batches, + the ptx_* rows of the PPO-init mix
        t = config.data.max_len
        out = {k: ((b, t), jnp.int32) for k in ("tokens", "mask", "loss_mask")}
        out["row_valid"] = ((b,), jnp.int32)
        if config.data.kind == "pretrain":
            out["segment_ids"] = ((b, t), jnp.int32)
        if ptx:
            out.update({f"ptx_{k}": ((ptx, t), jnp.int32) for k in ("tokens", "segment_ids", "mask", "loss_mask")})
            out["ptx_row_valid"] = ((ptx,), jnp.int32)
        return out

    b, ptx = config.batch_size, 0
    if config.data.kind == "demos":
        ptx = train_sft.ptx_rows_per_step(b, config.data.ptx_fraction, sharding.batch_divisor(mesh, rules))
    flops = _model_flops(cfg, b + ptx, config.data.max_len, devices)
    loss_fn = train_sft.make_loss_fn(Transformer(cfg), cfg, config)
    return _step_programs(config, cfg, loss_fn, spec(b, ptx), spec(config.eval_batch_size), flops, mesh, rules,
                          what, log)  # fmt: skip


def _rm_programs(config, mesh, rules, devices: int, what: str, log) -> list[Program]:
    cfg = ModelConfig.from_dict(config.model)
    if cfg.head != "scalar":
        raise ValueError(f"config.model.head={cfg.head!r}: a reward model needs head='scalar'")

    def spec(b, k):  # pipeline.comparison_batches
        t = config.data.max_len
        return {
            "tokens": ((b, k, t), jnp.int32),
            "mask": ((b, k, t), jnp.int32),
            "valid": ((b, k), jnp.int32),
            "pair_mask": ((b, k, k), jnp.int32),
            "row_valid": ((b,), jnp.int32),
        }

    b, k = config.batch_size, 2 if config.data.pairs_as_examples else config.data.k_max
    flops = _model_flops(cfg, b * k, config.data.max_len, devices)
    train, evaluation = spec(b, k), spec(config.eval_batch_size, config.data.k_max)  # validation: always grouped
    loss_fn = train_rm.make_loss_fn(Transformer(cfg))
    return _step_programs(config, cfg, loss_fn, train, evaluation, flops, mesh, rules, what, log)


def _ppo_model_configs(config) -> tuple[ModelConfig, ModelConfig]:
    if "aot" in config and "policy_model" in config.aot:
        policy, value = config.aot.policy_model, config.aot.value_model
    elif config.policy_from and config.rm_from:
        from instructjax import evaluate

        policy, value = evaluate.stage_config(config.policy_from).model, evaluate.stage_config(config.rm_from).model
    else:
        raise ValueError(
            "a PPO config names its models through its source workdirs: set config.policy_from and config.rm_from, "
            "or config.aot.policy_model and config.aot.value_model (configs/tpu.py does)"
        )
    policy_cfg = dataclasses.replace(ModelConfig.from_dict(policy), dropout_rate=0.0)
    value_cfg = dataclasses.replace(ModelConfig.from_dict(value), dropout_rate=0.0)
    if policy_cfg.head != "lm" or value_cfg.head != "scalar":
        raise ValueError("the PPO policy model needs head='lm' and the value/reward model head='scalar'")
    return policy_cfg, value_cfg


def _ppo_programs(config, mesh, rules, devices: int, what: str, log) -> list[Program]:
    policy_cfg, value_cfg = _ppo_model_configs(config)
    models = train_ppo.make_models(policy_cfg, value_cfg, config)
    for name in ("batch_size", "minibatch_size"):
        sharding.check_batch_size(f"config.{name}", config[name], mesh, rules)
    if config.batch_size % config.minibatch_size:
        raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of minibatch_size")
    minibatches = config.batch_size // config.minibatch_size
    total_updates = (config.num_iterations or math.ceil(config.total_episodes / config.batch_size)) * minibatches
    tx_policy = optim.make_optimizer(config.optim, total_updates * config.ppo_epochs)
    tx_value = optim.make_optimizer(config.value_optim, total_updates * config.ppo_epochs)
    new_state = train_ppo.make_new_state(config, tx_policy, tx_value)
    rng_data = jax.random.key_data(jax.random.key(config.seed))
    shapes, state_sh = train_ppo.abstract_state(new_state, models["policy"], models["value"], rng_data, mesh, rules)
    state = _abstract(shapes, state_sh)
    frozen_dtype = jnp.dtype(config.frozen_dtype) if config.frozen_dtype else None
    cast = lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype or x.dtype, sharding=x.sharding)  # noqa: E731
    frozen = {"ref": jax.tree.map(cast, state.params), "rm": jax.tree.map(cast, state.value_params)}
    replicated = NamedSharding(mesh, P())
    b, p, n = config.batch_size, config.data.max_prompt_len, config.max_new_tokens
    prompts = _batch(
        mesh, rules, {"prompt": ((b, p), jnp.int32), "prompt_mask": ((b, p), jnp.int32), "row_valid": ((b,), jnp.int32)}
    )
    score = train_ppo.make_score(models, config, eos_id=1, rm_bias=0.0)  # both are constants: no shapes
    size = bytes_per_device
    programs: list[Program] = []

    # Rollout: generate, then score; the update takes the rollout they produce (shapes and shardings).
    if policy_cfg.positions == "learned" and p + n > policy_cfg.max_len:
        raise ValueError(f"max_prompt_len {p} + max_new_tokens {n} exceeds the policy's max_len {policy_cfg.max_len}")
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
    kl = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    with_rollout = what in ("rollout", "all")
    trace = lambda: sampling.trace_generate(  # noqa: E731
        state.params, policy_cfg, prompts["prompt"], prompts["prompt_mask"], key,
        max_new_tokens=n, scalar_sharding=replicated,
    )  # fmt: skip
    if with_rollout:
        others = size((state.opt_state, state.value_params, state.value_opt_state, frozen))
        program, compiled = _compile(
            "ppo rollout: generate",
            trace,
            (state.params, prompts),
            mesh,
            rules,
            resident=others,
            while_trips=n,
            log=log,
        )
        programs.append(program)
        gen = _outputs(compiled) if compiled else _batch_sharded(_trace(trace, mesh, rules), mesh, rules)
    else:
        gen = _batch_sharded(_trace(trace, mesh, rules), mesh, rules)
    trace = lambda: score.trace(state.params, state.value_params, frozen, prompts, gen, kl, None)  # noqa: E731
    if with_rollout:
        others = size((state.opt_state, state.value_opt_state))
        program, compiled = _compile(
            "ppo rollout: score", trace, (state.params, state.value_params, frozen, prompts, gen), mesh, rules,
            resident=others, log=log,
        )  # fmt: skip
        programs.append(program)
        ro = _outputs(compiled) if compiled else _batch_sharded(_trace(trace, mesh, rules), mesh, rules)
    else:
        ro = _batch_sharded(_trace(trace, mesh, rules), mesh, rules)

    if what in ("train_step", "all"):
        update = train_ppo.make_update(models, policy_cfg, config, tx_policy, tx_value, mesh, rules, state_sh)
        rows = jax.ShapeDtypeStruct((config.minibatch_size,), jnp.int32, sharding=replicated)
        ptx_rows = train_ppo.ptx_rows_per_minibatch(config, sharding.batch_divisor(mesh, rules))
        ptx = None
        if ptx_rows:
            t = config.data.ptx_len
            spec = {k: ((ptx_rows, t), jnp.int32) for k in ("tokens", "segment_ids", "mask", "loss_mask")}
            ptx = _batch(mesh, rules, {**spec, "row_valid": ((ptx_rows,), jnp.int32)})
        mb_tokens = config.minibatch_size * (p + n)
        flops = (
            metrics.training_flops_per_token(policy_cfg, p + n) * mb_tokens
            + metrics.training_flops_per_token(value_cfg, p + n) * mb_tokens
            + (metrics.training_flops_per_token(policy_cfg, config.data.ptx_len) * ptx_rows * config.data.ptx_len)
        ) / devices
        program, _ = _compile(
            "ppo train_step (minibatch update)",
            lambda: update.trace(state, ro, rows, ptx),
            (state, ro, ptx),
            mesh,
            rules,
            resident=size(frozen),
            model_flops=flops,
            log=log,
        )
        programs.insert(0, program)
    return programs


def compile_config(config: Any, topo: str | Topology, what: str = "all", log=None) -> dict[str, Any]:
    """Compile ``config``'s programs for the TPU slice ``topo``; returns the report (``report_dict``'s form
    plus the ``Program`` list under ``programs``). ``what``: 'train_step', 'eval_step' (SFT, RM), 'rollout'
    (PPO) or 'all'."""
    if what not in WHAT:
        raise ValueError(f"what={what!r}: expected one of {WHAT}")
    stage = config.get("stage", "")
    if stage not in ("sft", "pretrain", "rm", "ppo"):
        raise ValueError(f"config.stage={stage!r}: expected 'sft', 'pretrain', 'rm' or 'ppo'")
    if stage != "ppo" and what == "rollout":
        raise ValueError(f"stage {stage!r} has no rollout; use --what=train_step, eval_step or all")
    if stage == "ppo" and what == "eval_step":
        raise ValueError("PPO's evaluation (sampling + RM scoring in evaluate.py) is not compiled here; use "
                         "--what=train_step, rollout or all")  # fmt: skip
    topo = topology(topo) if isinstance(topo, str) else topo
    mesh = sharding.make_mesh(config.mesh_shape, devices=topo.devices)
    rules = sharding.as_rules(config.rules)
    start = time.perf_counter()
    devices = len(topo.devices)
    if stage in ("sft", "pretrain"):
        programs = _sft_programs(config, mesh, rules, devices, what, log)
    elif stage == "rm":
        programs = _rm_programs(config, mesh, rules, devices, what, log)
    else:
        programs = _ppo_programs(config, mesh, rules, devices, what, log)
    return {
        "topology": topo.name,
        "family": topo.family,
        "devices": devices,
        "chips": topo.chips,
        "mesh": dict(mesh.shape),
        "hbm_bytes_per_device": topo.hbm_bytes_per_device,
        "programs": programs,
        "wall_seconds": time.perf_counter() - start,
    }


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
        }
        for p in report["programs"]
    ]
    out["fits"] = all(p["fits"] for p in out["programs"])
    return out


def format_table(report: dict[str, Any], label: str = "") -> str:
    """The human-readable per-device table."""
    hbm = report["hbm_bytes_per_device"]
    gib = lambda x: f"{x / GiB:.2f}"  # noqa: E731
    head = (
        f"{label + ' ' if label else ''}on {report['topology']} ({report['chips']} chips, {report['devices']} devices, "
        f"mesh {report['mesh']}); per device, GiB; HBM {gib(hbm)} GiB"
    )
    cols = ("program", "args", "outputs", "aliased", "temps", "code", "resident", "total", "headroom", "fits",
            "TFLOPs", "XLA TFLOPs", "model TFLOPs", "compile s")  # fmt: skip
    rows = []
    for p in report["programs"]:
        rows.append((
            p.name, gib(p.argument_bytes), gib(p.output_bytes), gib(p.alias_bytes), gib(p.temp_bytes),
            gib(p.code_bytes), gib(p.resident_bytes), gib(p.total_bytes), gib(hbm - p.total_bytes),
            "yes" if p.total_bytes <= hbm and not p.error else "NO",
            f"{p.flops / 1e12:.2f}", f"{p.xla_flops / 1e12:.2f}",
            "-" if p.model_flops is None else f"{p.model_flops / 1e12:.2f}", f"{p.compile_seconds:.0f}",
        ))  # fmt: skip
    widths = [max(len(str(r[i])) for r in (cols, *rows)) for i in range(len(cols))]

    def line(r):
        cells = [str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True))]
        return "  ".join(cells)

    notes = [f"{p.name}: refused by the XLA TPU compiler: {p.error}" for p in report["programs"] if p.error]
    return "\n".join([head, line(cols), *(line(r) for r in rows), *notes])


def run(config: Any, topology_name: str, what: str = "all", label: str = "") -> dict[str, Any]:
    """``scripts/aot_compile.py``: compile, print the table, then one JSON line; returns the JSON data."""
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = compile_config(config, topology_name, what, log=log)
    print(format_table(report, label))
    data = report_dict(report)
    data["config"] = label
    slice_ = config.get("tpu_slice", "")
    if slice_ and slice_ != topology_name:
        log(f"[aot] note: this preset is meant for {slice_}, compiled here for {topology_name}")
    print(json.dumps(data))
    return data

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
  ``pair_mask [B,K,K]``, ``row_valid [B]``; packed (``data.pack_rows = R``), the training batch is
  ``tokens, mask [R,T]``, ``slots, valid [G,K]``, ``pair_mask [G,K,K]``, ``row_valid [G]``
  (G = ``train_rm.packed_groups``).
- PPO ('ppo'): ``train_step`` is ``ppo_steps.make_update`` (one minibatch: policy + value Adam steps, and
  the ptx term on ``ppo_steps.ptx_rows_per_minibatch`` pretraining rows); ``rollout`` is the program of
  ``sampling.generate`` (prefill + decode loop over the KV cache) for ``batch_size`` prompts of
  ``data.max_prompt_len`` tokens, and ``ppo_steps.make_score`` (``rollout.score`` + ``finish``). Each takes the
  previous one's output shapes and shardings, as in an iteration.

PPO keeps four parameter sets on the chips the whole time, but each program takes only some of them as
arguments: the bytes of the others (e.g. both Adam states during generation) are added to its total as
``resident``, so "fits" means the whole iteration fits. The PPO models come from ``config.aot``
(``policy_model``, ``value_model``: what the ``policy_from``/``rm_from`` workdirs will hold; the TPU presets
set them), else from those workdirs' ``config.json``.

The compiling itself (the slice, a program's per-device memory plan and FLOPs, the report's table) is
``aot_compiler.py``; this module builds each stage's programs and compiles them with it.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from instructjax import metrics, optim, ppo_setup, ppo_steps, sampling, sharding, stage, steps, train_rm, train_sft
from instructjax.aot_compiler import (
    Program,
    Topology,
    abstract_arrays,
    abstract_batch,
    batch_sharded_outputs,
    bytes_per_device,
    compile_program,
    compiled_outputs,
    format_table,
    report_dict,
    topology,
    trace_in_mesh,
)
from instructjax.model import ModelConfig, Transformer

WHAT = ("train_step", "eval_step", "rollout", "all")


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
    state = abstract_arrays(shapes, state_sh)
    programs = []
    if what in ("train_step", "all"):
        sharding.check_batch_size("config.batch_size", train_spec["row_valid"][0][0], mesh, rules)
        step = steps.make_train_step(loss_fn, tx, state_sh, config.nan_policy)
        batch = abstract_batch(mesh, rules, train_spec)
        name = f"{config.stage} train_step"
        program, _ = compile_program(
            name, lambda: step.trace(state, batch), (state, batch), mesh, rules, model_flops=flops, log=log
        )
        programs.append(program)
    if what in ("eval_step", "all"):
        sharding.check_batch_size("config.eval_batch_size", eval_spec["row_valid"][0][0], mesh, rules)
        evaluate = steps.make_eval_step(loss_fn, state_sh.params)
        batch = abstract_batch(mesh, rules, eval_spec)
        others = bytes_per_device((state.opt_state, state.step, state.rng))
        program, _ = compile_program(
            f"{config.stage} eval_step",
            lambda: evaluate.trace(state.params, batch),
            (state.params, batch),
            mesh,
            rules,
            resident=others,
            log=log,
        )
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
    return _step_programs(
        config, cfg, loss_fn, spec(b, ptx), spec(config.eval_batch_size), flops, mesh, rules, what, log
    )


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
    if rows := config.data.get("pack_rows", 0):  # pipeline.packed_comparison_batches
        sharding.check_batch_size("config.data.pack_rows", rows, mesh, rules)
        g, t = train_rm.packed_groups(rows, sharding.batch_divisor(mesh, rules)), config.data.max_len
        flops = _model_flops(cfg, rows, t, devices)
        train = {**spec(g, k), "tokens": ((rows, t), jnp.int32), "mask": ((rows, t), jnp.int32)}
        train["slots"] = ((g, k), jnp.int32)
    loss_fn = train_rm.make_loss_fn(Transformer(cfg))
    return _step_programs(config, cfg, loss_fn, train, evaluation, flops, mesh, rules, what, log)


def ppo_plan(config: Any, mesh: Any, rules: Any) -> ppo_setup.Plan:
    """``ppo_setup.plan`` for the models ``config.aot`` names (``policy_model``, ``value_model``: what the
    ``policy_from``/``rm_from`` workdirs will hold; the TPU presets set them), else those workdirs' models:
    the same checks, counts, optimizer schedules and state shardings as training."""
    if "aot" in config and "policy_model" in config.aot:
        policy, value = config.aot.policy_model, config.aot.value_model
    elif config.policy_from and config.rm_from:
        policy, value = stage.read_config(config.policy_from).model, stage.read_config(config.rm_from).model
    else:
        raise ValueError(
            "a PPO config names its models through its source workdirs: set config.policy_from and config.rm_from, "
            "or config.aot.policy_model and config.aot.value_model (configs/tpu.py does)"
        )
    policy_cfg, value_cfg = ppo_setup.model_configs(policy, value, ("the policy model", "the value model"))
    return ppo_setup.plan(config, policy_cfg, value_cfg, mesh, rules)


def _ppo_programs(config, mesh, rules, devices: int, what: str, log) -> list[Program]:
    ppo = ppo_plan(config, mesh, rules)
    policy_cfg, value_cfg, models = ppo.policy_cfg, ppo.value_cfg, ppo.models
    state = abstract_arrays(ppo.shapes, ppo.state_sh)
    frozen_dtype = jnp.dtype(config.frozen_dtype) if config.frozen_dtype else None
    cast = lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype or x.dtype, sharding=x.sharding)
    frozen = {"ref": jax.tree.map(cast, state.params), "rm": jax.tree.map(cast, state.value_params)}
    replicated = NamedSharding(mesh, P())
    b, p, n = config.batch_size, config.data.max_prompt_len, config.max_new_tokens
    prompts = abstract_batch(
        mesh, rules, {"prompt": ((b, p), jnp.int32), "prompt_mask": ((b, p), jnp.int32), "row_valid": ((b,), jnp.int32)}
    )
    score = ppo_steps.make_score(models, config, eos_id=1, rm_bias=0.0)  # both are constants: no shapes
    size = bytes_per_device
    programs: list[Program] = []

    # Rollout: generate, then score; the update takes the rollout they produce (shapes and shardings). Their
    # lengths against the models' positions were checked by the plan.
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
    kl = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    with_rollout = what in ("rollout", "all")
    # Generation reads the policy in the decode layout (``train_ppo.decode_layout``): a copy whole over data and
    # fsdp, in the compute dtype, beside the training params, which stay resident.
    gen_params, training_copy = state.params, 0
    if sharding.reshards_for_decoding(config.get("decode_layout", "replicated"), mesh):
        cast = functools.partial(sharding.cast_for_compute, dtype=jnp.dtype(policy_cfg.dtype))
        shapes = jax.eval_shape(cast, ppo.shapes.params)
        gen_params = abstract_arrays(shapes, sharding.decode_shardings(ppo.state_sh.params))
        training_copy = size(state.params)
    trace = lambda: sampling.trace_generate(
        gen_params,
        policy_cfg,
        prompts["prompt"],
        prompts["prompt_mask"],
        key,
        max_new_tokens=n,
        scalar_sharding=replicated,
    )
    if with_rollout:
        others = size((state.opt_state, state.value_params, state.value_opt_state, frozen)) + training_copy
        program, compiled = compile_program(
            "ppo rollout: generate",
            trace,
            (gen_params, prompts),
            mesh,
            rules,
            resident=others,
            while_trips=n,
            log=log,
        )
        programs.append(program)
        gen = (
            compiled_outputs(compiled)
            if compiled
            else batch_sharded_outputs(trace_in_mesh(trace, mesh, rules), mesh, rules)
        )
    else:
        gen = batch_sharded_outputs(trace_in_mesh(trace, mesh, rules), mesh, rules)
    trace = lambda: score.trace(state.params, state.value_params, frozen, prompts, gen, kl, None)
    if with_rollout:
        others = size((state.opt_state, state.value_opt_state))
        program, compiled = compile_program(
            "ppo rollout: score",
            trace,
            (state.params, state.value_params, frozen, prompts, gen),
            mesh,
            rules,
            resident=others,
            log=log,
        )
        programs.append(program)
        ro = (
            compiled_outputs(compiled)
            if compiled
            else batch_sharded_outputs(trace_in_mesh(trace, mesh, rules), mesh, rules)
        )
    else:
        ro = batch_sharded_outputs(trace_in_mesh(trace, mesh, rules), mesh, rules)

    if what in ("train_step", "all"):
        update = ppo_steps.make_update(
            models, policy_cfg, config, ppo.tx_policy, ppo.tx_value, mesh, rules, ppo.state_sh
        )
        rows = jax.ShapeDtypeStruct((config.minibatch_size,), jnp.int32, sharding=replicated)
        ptx_rows = ppo.ptx_rows
        ptx = None
        if ptx_rows:
            t = config.data.ptx_len
            spec = {k: ((ptx_rows, t), jnp.int32) for k in ("tokens", "segment_ids", "mask", "loss_mask")}
            ptx = abstract_batch(mesh, rules, {**spec, "row_valid": ((ptx_rows,), jnp.int32)})
        mb_tokens = config.minibatch_size * (p + n)
        flops = (
            metrics.training_flops_per_token(policy_cfg, p + n) * mb_tokens
            + metrics.training_flops_per_token(value_cfg, p + n) * mb_tokens
            + (metrics.training_flops_per_token(policy_cfg, config.data.ptx_len) * ptx_rows * config.data.ptx_len)
        ) / devices
        program, _ = compile_program(
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
        raise ValueError(
            "PPO's evaluation (sampling + RM scoring in evaluate.py) is not compiled here; use "
            "--what=train_step, rollout or all"
        )
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


def run(config: Any, topology_name: str, what: str = "all", label: str = "") -> dict[str, Any]:
    """``scripts/aot_compile.py``: compile, print the table, then one JSON line; returns the JSON data."""
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    report = compile_config(config, topology_name, what, log=log)
    print(format_table(report, label))
    data = report_dict(report)
    data["config"] = label
    slice_ = config.get("tpu_slice", "")
    if slice_ and slice_ != topology_name:
        log(f"[aot] note: this preset is meant for {slice_}, compiled here for {topology_name}")
    print(json.dumps(data))
    return data

"""The training loop every stage shares: resume, steps, logging, evaluation, checkpoints, preemption.

A stage's ``train()`` builds its data, state and jitted step, then hands them to ``run``, which owns
everything that must be the same for every stage:

- **Resume.** The newest checkpoint in ``workdir/checkpoints`` that restores (a damaged one is skipped, and
  named) is restored: state, data iterators, the loop's own ``meta``; rerunning a command continues it exactly.
- **Steps.** ``step_fn(state) -> (state, out)`` is called ``micro_steps`` times per counted step (gradient
  accumulation); ``out`` holds scalars. ``out["real_tokens"]`` / ``out["computed_tokens"]`` (if present)
  give the throughput and MFU columns.
- **Logging** every ``config.log_every`` steps to ``metrics.jsonl``, TensorBoard and a progress bar.
- **Evaluation** every ``config.eval_every`` steps and at the end; the best by ``select`` is saved in
  ``workdir/best``.
- **Checkpoints** every ``config.checkpoint_every`` steps, at the end, and on SIGTERM (then the loop
  stops with status ``"preempted"``; on many hosts, all stop at the step where any one got it). On any
  exception, in-flight writes still finish, so a crash loses at most the work since the last save.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from instructjax import checkpoint, metrics, steps

# A stage stopped by SIGTERM has saved its checkpoint; the scripts exit with this status (EX_TEMPFAIL, "try
# again") so a scheduler or wrapper can tell it from a finished run (0) and from a failure (1): rerun the same
# command to resume.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """A stage of a multi-stage job (the pipeline, an ablation's upstream) stopped by SIGTERM after saving: the
    job stops there, and rerunning its command resumes that stage."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How ``run`` drives one stage, built once from its config by ``settings``."""

    name: str  # the stage (``config.stage``): the progress bar's label
    total_steps: int  # counted steps (optimizer updates; PPO iterations)
    select: tuple[str, str]  # (evaluation metric, "min" | "max"): which evaluation keeps ``workdir/best``
    log_every: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    nan_policy: str  # "stop": a non-finite loss, gradient or update stops the run naming the step; "skip"
    micro_steps: int = 1  # ``step_fn`` calls per counted step (gradient accumulation)
    flops_per_token: float = 0.0  # training FLOPs per computed token, for the MFU column (0: no MFU)
    eval_at_start: bool = False  # also evaluate the initial params (step 0; not a candidate for ``best``)
    progress_keys: tuple[str, ...] = ("loss", "tokens_per_s", "mfu")  # logged metrics shown on the progress bar
    wandb: dict | None = None  # Weights & Biases logging (``metrics.MetricsWriter``): project, mode, config; None: off

    def __post_init__(self):
        if self.select[1] not in ("min", "max"):
            raise ValueError(f"select direction {self.select[1]!r}: expected 'min' or 'max'")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"config.nan_policy={self.nan_policy!r}: expected 'stop' or 'skip'")
        for name in ("total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "micro_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")


def settings(config: Any, *, total_steps: int, select: tuple[str, str], **fields: Any) -> Settings:
    """The ``Settings`` of a stage: its config's ``stage``, ``log_every``, ``eval_every``, ``checkpoint_every``,
    ``keep_checkpoints``, ``nan_policy`` and ``logging.wandb``, with ``total_steps``, ``select`` and any other
    field given."""
    logging = config.get("logging")
    if logging is not None and logging.get("wandb", False):
        fields.setdefault(
            "wandb", {"project": logging.wandb_project, "mode": logging.wandb_mode, "config": config.to_dict()}
        )
    return Settings(
        name=config.stage,
        total_steps=total_steps,
        select=select,
        log_every=config.log_every,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints,
        nan_policy=config.nan_policy,
        **fields,
    )


@dataclasses.dataclass
class Result:
    state: Any
    status: str  # "done" or "preempted"
    meta: dict  # best, best_step, evals, train_seconds, wall_seconds (this run's share added)
    resumed: bool


def run(
    settings: Settings,
    workdir: pathlib.Path,
    *,
    state: Any,
    state_shardings: Any,
    iters: dict[str, Any],
    step_fn: Callable[[Any], tuple[Any, dict]],
    evaluate: Callable[[Any], dict[str, float]],
    start_info: dict[str, Any],
    lr_fn: Callable[[int], float] | None = None,
    started_at: float | None = None,
) -> Result:
    """Run ``step_fn`` to ``settings.total_steps`` (resuming if a checkpoint exists); see the module docstring.

    ``state`` is a ``steps.TrainState``-like struct (``step``, ``params``, ``skipped_steps``) sharded as
    ``state_shardings``; ``iters`` the data iterators whose state is checkpointed; ``evaluate(params)`` returns
    metrics; ``start_info`` goes into the first metrics row; ``lr_fn(step)`` is logged; ``started_at``
    (``time.perf_counter()`` when the stage began) counts set-up time into ``wall_seconds``.
    """
    s = settings
    total_steps, micro_steps = s.total_steps, s.micro_steps  # read often below
    wall_start = started_at or time.perf_counter()
    key, direction = s.select

    # ----------------------------------------------------------------- Restore (automatic resume)
    ckpt = checkpoint.Checkpointer(workdir, keep=s.keep_checkpoints)
    meta = {"best": None, "best_step": None, "evals": [], "train_seconds": 0.0, "wall_seconds": 0.0}
    restored = ckpt.restore(state, state_shardings, iters)
    if restored is not None:
        state, meta = restored
    start_step = int(state.step) // micro_steps
    if restored is not None and jax.process_index() == 0:
        print(f"[{s.name}] resuming from step {start_step} of {total_steps} ({workdir / 'checkpoints'})", flush=True)

    # ----------------------------------------------------------------- Loop
    writer = metrics.MetricsWriter(workdir, total_steps, resume_step=start_step, desc=s.name, wandb=s.wandb)
    peak = metrics.peak_flops_per_device() * jax.device_count()
    writer.write(
        start_step,
        {"event": "start", "total_steps": total_steps, "devices": jax.device_count(), "resumed": restored is not None}
        | start_info,
    )
    if s.eval_at_start and start_step == 0 and not meta["evals"]:  # the starting point, for curves and comparison
        result = evaluate(state.params)
        meta["evals"].append({"step": 0, **result})
        writer.write(0, result)
    real_since = computed_since = 0.0
    timer, compiled = time.perf_counter(), False
    status = "done"
    try:
        with checkpoint.PreemptionGuard() as guard:
            for step in range(start_step, total_steps):
                if _any_process(guard.requested):
                    status = "preempted"
                    break
                for _ in range(micro_steps):
                    t0 = time.perf_counter()
                    state, out = step_fn(state)
                    if s.nan_policy == "stop":
                        steps.check_finite(step + 1, {k: out[k] for k in ("loss", "grad_norm", "finite") if k in out})
                    if not compiled:  # the first step's time is compilation, kept out of throughput
                        compiled = True
                        writer.write(step, {"event": "compiled", "compile_seconds": time.perf_counter() - t0})
                        writer.restart_clock(step)  # the ETA counts steps after compilation
                        timer = time.perf_counter()
                    else:
                        real_since += float(out.get("real_tokens", 0.0))
                        computed_since += float(out.get("computed_tokens", 0.0))
                done = step + 1
                if done % s.log_every == 0 or done == total_steps:
                    elapsed = max(time.perf_counter() - timer, 1e-9)
                    row = {k: float(v) for k, v in out.items() if k != "finite"}
                    row.update(
                        tokens_per_s=real_since / elapsed,  # non-pad tokens
                        mfu=computed_since / elapsed * s.flops_per_token / peak,  # every computed position
                        skipped_steps=int(state.skipped_steps),
                    )
                    if lr_fn is not None:
                        row["lr"] = float(lr_fn(done))
                    writer.write(done, row)
                    writer.progress(done, **{k: row[k] for k in s.progress_keys if k in row})
                    meta["train_seconds"] += elapsed
                    real_since = computed_since = 0.0
                    timer = time.perf_counter()
                if done % s.eval_every == 0 or done == total_steps:
                    result = evaluate(state.params)
                    value = result[key]
                    if meta["best"] is None or (value < meta["best"] if direction == "min" else value > meta["best"]):
                        meta["best"], meta["best_step"] = value, done
                        ckpt.save_best(state.params, done)
                    meta["evals"].append({"step": done, **result})
                    writer.write(done, {**result, f"best_{key}": meta["best"]})
                    timer = time.perf_counter()
                if done % s.checkpoint_every == 0 or done == total_steps:
                    meta["wall_seconds"] += time.perf_counter() - wall_start  # this run's share, saved with the step
                    wall_start = time.perf_counter()
                    ckpt.save(state, iters, meta)
            if status == "preempted":
                ckpt.save(state, iters, meta)
    finally:
        try:
            ckpt.close()  # waits for the last write; checkpoint.CheckpointError if a write failed
        finally:
            writer.close()
    meta["wall_seconds"] += time.perf_counter() - wall_start
    return Result(state=state, status=status, meta=meta, resumed=restored is not None)


def _any_process(flag: bool) -> bool:
    """Whether any process has ``flag`` set. A preemption notice may reach the hosts of a slice at different
    steps; they must all stop at the same one, or those still stepping wait forever in a collective."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def summary(result: Result, total_steps: int, micro_steps: int = 1, **extra: Any) -> dict[str, Any]:
    """The stage summary written to ``summary.json``."""
    best_eval = next((e for e in result.meta["evals"] if e["step"] == result.meta["best_step"]), None)
    return {
        "status": result.status,
        "step": int(result.state.step) // micro_steps,
        "total_steps": total_steps,
        "final": result.meta["evals"][-1] if result.meta["evals"] else None,
        "best": result.meta["best"],
        "best_step": result.meta["best_step"],
        "best_eval": best_eval,
        "train_seconds": result.meta["train_seconds"],
        "wall_seconds": result.meta["wall_seconds"],
        **extra,
    }

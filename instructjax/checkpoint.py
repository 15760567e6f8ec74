"""Checkpoints with orbax: save, automatic resume, restore onto any mesh, params-only hand-off.

A stage's ``workdir/checkpoints/<step>/`` holds these items, written together:

- ``params``: the model params (the only item another stage needs: ``load_params``),
- ``train``: the rest of the state (``steps.TrainState``, or PPO's ``ppo_steps.PPOState``: step, optimizer
  states, RNG, skip counter; PPO's value model and β too),
- ``data_<name>``: the grain iterator state of each data iterator the stage checkpoints (``data_train``,
  ``data_ptx``, ``data_prompts``), per process, so resume continues the data order exactly,
- ``meta``: JSON (the loop's own state: best eval so far, elapsed time, ...).

``workdir/best/<step>/`` holds ``params`` alone: the best evaluation so far (``save_best``).

Saves are asynchronous (training continues while the files are written); ``close`` waits. Restores
go through abstract targets that carry shardings, so a checkpoint written on one mesh restores onto
another. ``PreemptionGuard`` turns SIGTERM (a TPU preemption notice) into "save now and exit".

**Damaged checkpoints.** A step can be unreadable (a full disk or a lost node while it was written, files
truncated or deleted since). ``Checkpointer.restore`` and ``load_params`` try the steps newest first and take
the first that restores completely; each step passed over is announced in one printed line::

    checkpoint: skipping step 6 in /w/checkpoints: it cannot be restored (KeyError: Item "params" was not ...)

With no step left, ``CheckpointError`` names the directory and each step's reason. Orbax writes a step into a
temporary directory and renames it when complete, so a write cut short leaves ``<step>.orbax-checkpoint-tmp``,
which is never listed (the next save of that step replaces it). Some damage costs nothing: a step whose
``_CHECKPOINT_METADATA`` is missing or unreadable still restores (orbax logs it and reads the items). After a
step whose array files are damaged fails, the reads orbax still had in flight may print ``RuntimeError: Event
loop is closed`` tracebacks on stderr (orbax closes its event loop at the first error): noise, not a failure.

**Failed saves.** A write that cannot complete (disk full, directory gone) raises ``CheckpointError`` naming
the step, the directory and the cause. An asynchronous write fails in the background: its error is raised
by the next ``save`` or by ``close``. The steps saved before are never touched by a failed save (orbax deletes
old steps, ``keep``, only after a save completes), so a rerun resumes from the newest of them.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from instructjax.steps import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, or no checkpoint of a directory could be restored."""


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """Owns ``workdir/checkpoints``; ``keep`` most recent steps are kept."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 2, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.async_save = async_save
        self._best = None
        self._in_flight: int | None = None  # the step whose asynchronous write may still be running
        self._failed = False  # a write failed (and ``CheckpointError`` said so)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iters: dict[str, Any], meta: dict) -> None:
        """Start writing ``state`` (its step), the iterators' states and ``meta``. ``CheckpointError`` if this
        write, or the previous one still in flight, fails."""
        step = int(state.step)
        self._finish_in_flight()
        if step in self.manager.all_steps():
            return
        if self.async_save:
            # The train step donates the state; on CPU orbax's host view of a buffer is zero-copy, so an
            # async write could read buffers the next step already overwrote (seen as an inexact resume).
            # Saving a copy keeps the written values fixed, at the cost of one extra state in memory.
            state = jax.tree.map(lambda x: x.copy(), state)
        args = {
            "params": ocp.args.StandardSave(state.params),
            "train": ocp.args.StandardSave(state.replace(params=None)),
            "meta": ocp.args.JsonSave(meta),
        }
        for name, it in data_iters.items():
            args[f"data_{name}"] = grain.checkpoint.CheckpointSave(it)
        with self._failure_named(self.manager, step):
            self.manager.save(step, args=ocp.args.Composite(**args))
        self._in_flight = step

    def save_best(self, params: Any, step: int) -> None:
        """Params of the best evaluation so far, kept apart (``workdir/best``) so ``keep`` never deletes them.
        Written synchronously; ``CheckpointError`` if it fails (the previous best is then still there)."""
        if self._best is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True)
            self._best = ocp.CheckpointManager(self.directory.parent / "best", options=options)
        if step not in self._best.all_steps():
            with self._failure_named(self._best, step):
                self._best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))

    def restore(
        self, state_like: TrainState, shardings: TrainState, data_iters: dict[str, Any]
    ) -> tuple[TrainState, dict] | None:
        """Restore the newest step that restores completely onto ``shardings`` (and the iterators in place);
        None if there is no step.

        Steps are tried newest first; a step that fails is announced and passed over (module docstring), and
        ``CheckpointError`` says why each failed when none is left. A step's ``params``, ``train`` and
        ``meta`` are restored first; only then are the iterators set from its ``data_*`` items, so a step
        whose state is damaged never touches them, and a step whose data item fails after another iterator
        was set is passed over for an older one, which sets every iterator again."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        state_args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(state_like.params, shardings.params)),
            train=ocp.args.StandardRestore(_abstract(state_like.replace(params=None), shardings.replace(params=None))),
            meta=ocp.args.JsonRestore(),
        )
        data_args = ocp.args.Composite(
            **{f"data_{name}": grain.checkpoint.CheckpointRestore(it) for name, it in data_iters.items()}
        )

        def restore_step(step: int) -> Any:
            restored = self.manager.restore(step, args=state_args)
            if data_iters:
                self.manager.restore(step, args=data_args)  # sets the iterators in place
            return restored

        restored = _restore_newest(self.directory, steps, restore_step)
        return restored["train"].replace(params=restored["params"]), dict(restored["meta"])

    def close(self) -> None:
        """Wait for the write in flight (``CheckpointError`` if it failed) and release the managers."""
        try:
            self._finish_in_flight()
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self._failed:  # else orbax is raising the reported failure again, from another thread
                    raise
            if self._best is not None:
                self._best.close()

    def _finish_in_flight(self) -> None:
        step, self._in_flight = self._in_flight, None
        if step is not None:
            with self._failure_named(self.manager, step):
                self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _failure_named(self, manager: ocp.CheckpointManager, step: int) -> Iterator[None]:
        """Turn any error of writing ``step`` with ``manager`` into ``CheckpointError`` naming the step, the
        directory, the cause and the newest step saved before it."""
        try:
            yield
        except Exception as error:
            self._failed = True
            earlier = max((s for s in manager.all_steps() if s != step), default=None)
            if earlier is None:
                after = "no step was saved before it" + ("" if manager is self._best else ": a rerun starts over")
            elif manager is self._best:
                after = f"the best params saved before it (step {earlier}) are untouched"
            else:
                after = f"the steps saved before it are untouched: a rerun resumes from step {earlier}"
            raise CheckpointError(
                f"could not save step {step} in {manager.directory} ({_reason(error)}); {after}"
            ) from error


def final_step(workdir: str | pathlib.Path) -> int | None:
    """The latest saved step of a stage (None when it has no checkpoint)."""
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    if not directory.exists():
        return None
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as manager:
        return manager.latest_step()


def load_params(
    workdir: str | pathlib.Path, params_like: Any, shardings: Any, step: int | None = None, best: bool = False
) -> Any:
    """Params only, from a stage's workdir (the newest step whose params restore, unless ``step``; the best
    evaluation with ``best``), placed on ``shardings``: the hand-off SFT -> RM, SFT -> PPO. ``params_like``
    gives shapes and dtypes (arrays or ``ShapeDtypeStruct``s).

    Without ``step``, steps are tried newest first, as ``Checkpointer.restore`` does (a step passed over is
    announced; ``CheckpointError`` when none restores; ``best/`` holds one step only). With ``step``, that
    step alone is restored. ``FileNotFoundError`` when the directory holds no step."""
    directory = pathlib.Path(workdir).absolute() / ("best" if best else "checkpoints")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as manager:
        target = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params_like, shardings)))
        if step is not None:
            return manager.restore(step, args=target)["params"]
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        return _restore_newest(directory, steps, lambda s: manager.restore(s, args=target))["params"]


def _restore_newest(directory: pathlib.Path, steps: Sequence[int], restore_step: Callable[[int], Any]) -> Any:
    """``restore_step(step)`` for each of ``steps`` in turn until one succeeds on every process; a step that
    fails is announced (one line), and with none left ``CheckpointError`` gives each step's reason."""
    reasons = {}
    for step in steps:
        try:
            result, reason = restore_step(step), None
        except Exception as error:  # a damaged step fails in many ways: missing items, JSON, tensorstore, ...
            result, reason = None, _reason(error)
        if _on_every_process(reason is None):
            return result
        reasons[step] = reason or "unreadable on another process"
        if reason is not None or jax.process_index() == 0:
            print(
                f"checkpoint: skipping step {step} in {directory}: it cannot be restored ({reasons[step]})", flush=True
            )
    lines = "".join(f"\n  step {step}: {reason}" for step, reason in reasons.items())
    raise CheckpointError(f"no checkpoint in {directory} can be restored (tried newest first):{lines}")


def _reason(error: BaseException) -> str:
    """``"<class>: <first line of the message>"``, kept short: tensorstore's line also holds its whole spec
    (dropped) and the chain of drivers it opened (``Error opening "zarr" driver: ``, dropped)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else error  # KeyError's str() adds quotes
    line = next(iter(str(text).strip().splitlines()), "").split(" [tensorstore_spec")[0]
    line = re.sub(r'Error opening "\w+" driver: ', "", line)
    line = line if len(line) <= 400 else line[:397] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _on_every_process(ok: bool) -> bool:
    """Whether ``ok`` holds on every process: they must all restore the same step."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.asarray(ok)).all())


class PreemptionGuard:
    """Context manager: SIGTERM sets ``requested`` instead of killing the process, so the loop can
    save a checkpoint and exit cleanly (the previous handler is restored on exit)."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        del signum, frame
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

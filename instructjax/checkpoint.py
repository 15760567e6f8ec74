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
"""

from __future__ import annotations

import pathlib
import signal
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from instructjax.steps import TrainState


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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iters: dict[str, Any], meta: dict) -> None:
        step = int(state.step)
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
        self.manager.save(step, args=ocp.args.Composite(**args))

    def save_best(self, params: Any, step: int) -> None:
        """Params of the best evaluation so far, kept apart (``workdir/best``) so ``keep`` never deletes them."""
        if self._best is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True)
            self._best = ocp.CheckpointManager(self.directory.parent / "best", options=options)
        if step not in self._best.all_steps():
            self._best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))

    def restore(
        self, state_like: TrainState, shardings: TrainState, data_iters: dict[str, Any]
    ) -> tuple[TrainState, dict] | None:
        """Restore the latest step onto ``shardings`` (and the iterators in place); None if there is none."""
        step = self.latest_step()
        if step is None:
            return None
        args = {
            "params": ocp.args.StandardRestore(_abstract(state_like.params, shardings.params)),
            "train": ocp.args.StandardRestore(
                _abstract(state_like.replace(params=None), shardings.replace(params=None))
            ),
            "meta": ocp.args.JsonRestore(),
        }
        for name, it in data_iters.items():
            args[f"data_{name}"] = grain.checkpoint.CheckpointRestore(it)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["train"].replace(params=restored["params"]), dict(restored["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self._best is not None:
            self._best.close()


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
    """Params only, from a stage's workdir (latest step unless ``step``; the best evaluation with
    ``best``), placed on ``shardings``: the hand-off SFT -> RM, SFT -> PPO. ``params_like`` gives
    shapes and dtypes (arrays or ``ShapeDtypeStruct``s)."""
    directory = pathlib.Path(workdir).absolute() / ("best" if best else "checkpoints")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        target = ocp.args.StandardRestore(_abstract(params_like, shardings))
        return manager.restore(step, args=ocp.args.Composite(params=target))["params"]


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

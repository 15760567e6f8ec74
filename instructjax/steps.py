"""Train state, sharded initialisation, and the jitted train / eval steps (state donated).

``TrainState`` is a plain pytree: ``step``, ``params``, ``opt_state`` and ``rng`` (raw key data, so it
checkpoints as an ordinary uint32 array). A step's randomness is ``fold_in(rng, step)``: resuming at
step s replays exactly the dropout masks an uninterrupted run would have used.

Non-finite loss, gradients or update: the step reports ``finite``. With ``nan_policy='stop'`` the loop raises
(``check_finite``) naming the step and the metric before anything is saved; with ``'skip'`` the step
keeps the previous params and optimizer state inside jit and counts the skip (``skipped_steps``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from instructjax import sharding

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]  # (params, batch, rng) -> (loss, metrics)


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # jax.random.key_data of the run's base key
    skipped_steps: jax.Array


def create_train_state(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.Rules,
    seed: int,
) -> tuple[TrainState, TrainState]:
    """The state, created sharded (``init_params(rng)`` returns boxed params), and its shardings."""
    return sharding.init_sharded(train_state_init(init_params, tx), jax.random.key(seed), mesh, rules)


def abstract_train_state(
    init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, mesh: Mesh, rules: sharding.Rules
) -> tuple[TrainState, TrainState]:
    """``(shapes, shardings)`` of the state ``create_train_state`` would make; nothing is allocated (``aot.py``)."""
    return sharding.abstract_sharded(train_state_init(init_params, tx), mesh, rules)


def train_state_init(
    init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
    """``rng -> TrainState`` with boxed (logically named) leaves: what ``create_train_state`` runs sharded."""

    def init(rng):
        params = init_params(rng)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=nn.LogicallyPartitioned(jax.random.key_data(jax.random.fold_in(rng, 1)), (None,)),
            skipped_steps=jnp.zeros((), jnp.int32),
        )

    return init


def make_train_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, state_shardings: TrainState, nan_policy: str = "stop"
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)``, jitted with the state donated."""
    if nan_policy not in ("stop", "skip"):
        raise ValueError(f"nan_policy={nan_policy!r}: expected 'stop' or 'skip'")

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        if nan_policy == "skip":  # keep the old state where the update is not finite
            keep = lambda new, old: jnp.where(finite, new, old)
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        )
        return new_state, {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}

    return jax.jit(step, in_shardings=(state_shardings, None), out_shardings=(state_shardings, None), donate_argnums=0)


def check_finite(step: int, metrics: dict) -> None:
    """Raise ``FloatingPointError`` naming the step and every non-finite metric."""
    bad = {k: float(v) for k, v in metrics.items() if k != "finite" and not jnp.isfinite(jnp.asarray(v)).all()}
    if bad or not bool(metrics.get("finite", True)):
        raise FloatingPointError(
            f"non-finite values at step {step}: {bad or {'gradients': 'non-finite'}} "
            "(set config.nan_policy='skip' to skip such steps instead)"
        )


def make_eval_step(loss_fn: LossFn, params_shardings: Any) -> Callable[[Any, dict], dict]:
    """``eval(params, batch) -> metrics`` without dropout (``loss_fn`` gets ``rng=None``)."""

    def evaluate(params, batch):
        loss, metrics = loss_fn(params, batch, None)
        return {**metrics, "loss": loss}

    return jax.jit(evaluate, in_shardings=(params_shardings, None))

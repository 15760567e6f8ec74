"""PPO's jitted pieces (Ouyang et al. 2022, §3.5, App. C.4), what ``steps.py`` is to the supervised stages:
the state of the four parameter sets (``PPOState``), the models, the rollout's scoring program
(``make_score``), the minibatch update (``make_update``) and the KL coefficient's controller.

``train_ppo`` drives them one iteration at a time; ``aot`` compiles the same functions for a TPU slice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from instructjax import losses, rollout, scoring, sharding
from instructjax.model import ModelConfig, Transformer, unembedding


@struct.dataclass
class PPOState:
    step: jax.Array  # iterations done
    params: Any  # the policy (the ``params`` checkpoint item, what later stages load)
    opt_state: Any
    value_params: Any
    value_opt_state: Any
    kl_coef: jax.Array  # β (changes only with the adaptive controller)
    rng: jax.Array  # jax.random.key_data of the run's base key
    skipped_steps: jax.Array  # kept for loop.run; PPO stops on a non-finite update (nan_policy='stop')


def make_models(policy_cfg: ModelConfig, value_cfg: ModelConfig, config: Any) -> dict[str, Transformer]:
    """The four models keyed policy, ref, value, rm (the configs come with dropout off); the frozen reference
    and RM compute in ``config.frozen_dtype`` when it is set."""
    frozen = lambda cfg: Transformer(dataclasses.replace(cfg, dtype=config.frozen_dtype or cfg.dtype))
    return {
        "policy": Transformer(policy_cfg),
        "ref": frozen(policy_cfg),
        "value": Transformer(value_cfg),
        "rm": frozen(value_cfg),
    }


def make_new_state(
    config: Any, tx_policy: optax.GradientTransformation, tx_value: optax.GradientTransformation
) -> Callable[[Any, Any, Any], PPOState]:
    """``new_state(policy, value, rng_data)``: the state at iteration 0 (both optimizers initialised, β)."""

    def new_state(policy, value, rng_data):
        return PPOState(
            step=jnp.zeros((), jnp.int32),
            params=policy,
            opt_state=tx_policy.init(policy),
            value_params=value,
            value_opt_state=tx_value.init(value),
            kl_coef=jnp.asarray(config.kl.init_coef, jnp.float32),
            rng=rng_data,
            skipped_steps=jnp.zeros((), jnp.int32),
        )

    return new_state


def abstract_state(
    new_state: Callable, policy_model: Transformer, value_model: Transformer, rng_data: jax.Array, mesh, rules
) -> tuple[PPOState, PPOState]:
    """``(shapes, shardings)`` of the ``PPOState``; nothing is allocated (the checkpoint-loading targets)."""
    example = np.zeros((1, 8), np.int32)
    return sharding.abstract_sharded(
        lambda r: new_state(
            policy_model.init(r, example)["params"],
            value_model.init(r, example)["params"],
            nn.LogicallyPartitioned(rng_data, (None,)),
        ),
        mesh,
        rules,
    )


def make_score(models: dict[str, Transformer], config: Any, eos_id: int, rm_bias: float) -> Callable:
    """The jitted ``score(policy_params, value_params, frozen, batch, gen, kl_coef, host_scores, rm_weight)
    -> Rollout``: ``rollout.score`` of the generated responses (the reward: ``rm_weight`` × the RM plus the
    host-computed ``host_scores``, ``reward_fns``), then KL-shaped rewards, GAE and whitening
    (``rollout.finish``). ``rm_weight`` is static: a new weight compiles a new program."""

    @functools.partial(jax.jit, static_argnames=("rm_weight",))
    def score(policy_params, value_params, frozen, batch, gen, kl_coef, host_scores, rm_weight=1.0):
        out = rollout.score(
            models,
            {"policy": policy_params, "value": value_params, **frozen},
            batch["prompt"],
            batch["prompt_mask"],
            gen.tokens,
            gen.mask,
            eos_id=eos_id,
            rm_bias=rm_bias,
            missing_eos_penalty=config.missing_eos_penalty if config.use_missing_eos_penalty else None,
            temperature=config.temperature,
            minibatch_size=config.minibatch_size,
            rm_weight=rm_weight,
            host_scores=host_scores,
        )
        return rollout.finish(out, kl_coef, config.gamma, config.lam, config.whiten_rewards)

    return score


def make_update(
    models: dict[str, Transformer],
    policy_cfg: ModelConfig,
    config: Any,
    tx_policy: optax.GradientTransformation,
    tx_value: optax.GradientTransformation,
    mesh,
    rules,
    state_sh: PPOState,
) -> Callable:
    """The jitted minibatch ``update(state, rollout, rows, ptx) -> (state, metrics)`` (state donated): one
    optimizer step of the policy on the clipped surrogate (+ γ × the pretraining NLL of ``ptx`` for PPO-ptx)
    and one of the value model on the clipped value loss, both on the rollout's ``rows``."""
    policy_model, value_model = models["policy"], models["value"]

    def policy_loss_fn(params, mb, ptx):
        tokens = jnp.concatenate([mb.prompt, mb.response], axis=1)
        mask = jnp.concatenate([mb.prompt_mask, mb.response_mask], axis=1)
        logprobs, _ = scoring.response_logprobs(
            policy_model, params, tokens, mask, mb.prompt.shape[1], config.temperature
        )
        pg_loss, stats = losses.ppo_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.response_mask, config.clip_eps)
        stats["pg_loss"] = pg_loss
        loss = pg_loss
        if ptx is not None:  # PPO-ptx: γ · pretraining NLL, its gradient summed with the PPO gradient
            hidden = policy_model.apply(
                {"params": params}, ptx["tokens"], segment_ids_bt=ptx["segment_ids"], return_hidden=True
            )
            ptx_loss, _ = losses.fused_lm_loss(
                hidden, unembedding(params, policy_cfg), ptx["tokens"], ptx["loss_mask"], config.loss_chunk
            )
            stats["ptx_loss"] = ptx_loss
            loss = loss + config.ptx_coef * ptx_loss
        return loss, stats

    value_coef = config.get("value_coef", 1.0)

    def value_loss_fn(params, mb):
        tokens = jnp.concatenate([mb.prompt, mb.response], axis=1)
        mask = jnp.concatenate([mb.prompt_mask, mb.response_mask], axis=1)
        values = scoring.response_values(value_model, params, tokens, mask, mb.prompt.shape[1])
        loss, stats = losses.value_loss(values, mb.values, mb.returns, mb.response_mask, config.value_clip)
        # The value model has its own network and optimizer, so a coefficient (Huang et al. 2024 use 0.1) only
        # scales its gradient: under Adam that matters through gradient clipping and eps alone.
        return value_coef * loss, {**stats, "value_loss": loss}

    def update(state: PPOState, ro: rollout.Rollout, rows: jax.Array, ptx: dict | None) -> tuple[PPOState, dict]:
        mb = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(x[rows], sharding.batch_sharding(mesh, rules, x.ndim)), ro
        )
        (_, p_stats), p_grads = jax.value_and_grad(policy_loss_fn, has_aux=True)(state.params, mb, ptx)
        (_, v_stats), v_grads = jax.value_and_grad(value_loss_fn, has_aux=True)(state.value_params, mb)
        p_updates, opt_state = tx_policy.update(p_grads, state.opt_state, state.params)
        v_updates, value_opt_state = tx_value.update(v_grads, state.value_opt_state, state.value_params)
        new_state = state.replace(
            params=optax.apply_updates(state.params, p_updates),
            opt_state=opt_state,
            value_params=optax.apply_updates(state.value_params, v_updates),
            value_opt_state=value_opt_state,
        )
        grad_norm = optax.tree.norm(p_grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(v_grads))
        return new_state, {**p_stats, **v_stats, "grad_norm": grad_norm, "finite": finite}

    return jax.jit(update, donate_argnums=0, out_shardings=(state_sh, None))


def ptx_rows_per_minibatch(config: Any, batch_divisor: int) -> int:
    """PPO-ptx's pretraining rows per minibatch update: ``ptx_ratio × minibatch_size`` rounded up to whole
    batch shards; 0 for plain PPO (γ = 0)."""
    if config.ptx_coef <= 0:
        return 0
    return batch_divisor * math.ceil(config.ptx_ratio * config.minibatch_size / batch_divisor)


def kl_controller(kl: Any, coef: jax.Array, observed_kl: jax.Array, batch_size: int) -> jax.Array:
    """Fixed β, or the adaptive controller (Ziegler et al. 2019, §2.2):

    e = clip(KL / KL_target - 1, -0.2, 0.2),   β ← β · (1 + e · batch_size / horizon)
    """
    if kl.mode == "fixed":
        return coef
    if kl.mode != "adaptive":
        raise ValueError(f"config.kl.mode={kl.mode!r}: expected 'fixed' or 'adaptive'")
    error = jnp.clip(observed_kl / kl.target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * batch_size / kl.horizon)

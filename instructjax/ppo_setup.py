"""PPO's set-up, done once (Ouyang et al. 2022, §3.5, App. C.4): what ``train_ppo`` runs and what ``aot``
compiles, built by one function (``plan``) so the two cannot drift.

``check_config`` refuses a config that cannot run, naming the key; ``model_configs`` checks the policy and reward
model belong together; ``check_same_tokenizer`` that the RM reads the policy's tokens; ``plan`` derives the
models, counts, optimizers (schedules in optimizer updates) and the state's shapes and shardings, allocating
nothing.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import optax

from instructjax import configlib, optim, ppo_steps, reward_fns, sharding, stage
from instructjax.model import ModelConfig, Transformer
from instructjax.tokenizer import Tokenizer, load_tokenizer


def check_config(config: Any, mesh: Any, rules: Any) -> None:
    """Refuse a PPO config that cannot run, before anything is loaded or compiled, naming the key."""
    keys = ("batch_size", "minibatch_size", "max_new_tokens", "data.max_prompt_len", "eval_prompts", "temperature")
    keys += ("eval_batch_size", "clip_eps", "value_clip", "data.ptx_len")
    configlib.check_positive(config, keys)
    # A learning rate of 0 freezes that model (the tests check the first ratio that way); negative is nonsense.
    zero_ok = ("ptx_coef", "num_iterations", "optim.lr", "value_optim.lr")
    configlib.check_positive(config, ("ptx_ratio", *zero_ok), allow_zero=zero_ok)
    if not config.num_iterations and config.total_episodes <= 0:
        raise ValueError(f"config.total_episodes={config.total_episodes} must be > 0 (or set config.num_iterations)")
    try:  # the spec reads and its functions import ('gold' is checked against the data in train_ppo.make_data)
        reward_fns.parse(config.reward, gold=reward_fns.no_eos)
    except reward_fns.RewardError as e:
        raise ValueError(f"config.reward={config.reward!r}: {e}") from None
    if config.nan_policy != "stop":
        raise ValueError(f"config.nan_policy={config.nan_policy!r}: PPO supports only 'stop'")
    for name in ("batch_size", "minibatch_size"):
        sharding.check_batch_size(f"config.{name}", config[name], mesh, rules)
    k = config.get("samples_per_prompt", 1)
    if k < 1 or config.batch_size % k:
        raise ValueError(f"config.samples_per_prompt={k} must be >= 1 and divide config.batch_size={config.batch_size}")
    if k > 1:  # the prompts of an iteration are sharded over the batch axes like its episodes
        sharding.check_batch_size("config.batch_size / config.samples_per_prompt", config.batch_size // k, mesh, rules)
    if config.batch_size % config.minibatch_size:
        raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of minibatch_size")
    if config.ppo_epochs <= 0:
        raise ValueError(f"config.ppo_epochs={config.ppo_epochs} must be positive")
    minibatches = config.batch_size // config.minibatch_size
    for name in ("optim", "value_optim"):
        if minibatches % config[name].grad_accum_steps:
            raise ValueError(
                f"config.{name}.grad_accum_steps={config[name].grad_accum_steps} must divide the {minibatches} "
                "minibatches of an epoch (an optimizer update may not span two rollouts)"
            )


def model_configs(
    policy_model: Any,
    value_model: Any,
    sources: tuple[str, str] = ("config.policy_from", "config.rm_from"),
    compute_dtype: str = "",
) -> tuple[ModelConfig, ModelConfig]:
    """The policy's and the value/reward model's ``ModelConfig`` (from their stages' ``model`` sections), with
    dropout off (the first ratio is exactly 1). ``sources`` name where each came from, for the errors: the
    policy must be an LM and the reward model a scalar head, and they must share a vocabulary (PPO scores the
    policy's tokens with the RM). ``compute_dtype`` (``config.compute_dtype``, e.g. 'bfloat16') replaces the
    dtype all four models compute in; their params keep their own dtype (f32 master weights)."""
    dtype = {"dtype": compute_dtype} if compute_dtype else {}
    policy_cfg = dataclasses.replace(ModelConfig.from_dict(policy_model), dropout_rate=0.0, **dtype)
    value_cfg = dataclasses.replace(ModelConfig.from_dict(value_model), dropout_rate=0.0, **dtype)
    if policy_cfg.head != "lm":
        raise ValueError(f"{sources[0]} must hold a policy (head='lm'); it holds a model with head={policy_cfg.head!r}")
    if value_cfg.head != "scalar":
        raise ValueError(
            f"{sources[1]} must hold a reward model (head='scalar'); it holds a model with head={value_cfg.head!r}"
        )
    if policy_cfg.vocab_size != value_cfg.vocab_size:
        raise ValueError(
            f"{sources[0]} has a vocabulary of {policy_cfg.vocab_size} and {sources[1]} of {value_cfg.vocab_size}: "
            "the reward model must read the policy's tokens (train both from one tokenizer)"
        )
    return policy_cfg, value_cfg


def check_same_tokenizer(policy_tokenizer: Tokenizer, rm_tokenizer_path: pathlib.Path, config: Any) -> None:
    """Refuse an RM whose tokenizer is not the policy's: the RM would read the policy's token ids as other
    words. Compared by vocabulary size, special ids and the ids of a probe text."""
    rm_tokenizer = load_tokenizer(rm_tokenizer_path)
    probe = "The quick brown fox => 12 34, sort 5 2 9."
    fingerprint = lambda t: (t.vocab_size, t.eos_id, t.pad_id, t.encode(probe))
    if fingerprint(policy_tokenizer) != fingerprint(rm_tokenizer):
        raise ValueError(
            f"config.policy_from={config.policy_from} and config.rm_from={config.rm_from} use different tokenizers "
            f"({rm_tokenizer_path} is the RM's): the reward model must read the policy's tokens"
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything PPO derives from its config and model configs before it touches data or checkpoints: what
    ``train`` runs and what ``aot`` compiles, built by one function (``plan``) so the two cannot drift."""

    models: dict[str, Transformer]  # policy, ref, value, rm
    policy_cfg: ModelConfig
    value_cfg: ModelConfig
    total_steps: int  # iterations
    minibatches: int  # minibatch updates per epoch
    micro_per_iteration: int  # minibatch updates per iteration (all epochs)
    policy_updates: int  # optimizer updates over the run (micro-batches / grad_accum_steps): the schedules' length
    value_updates: int
    ptx_rows: int  # pretraining rows per minibatch (0 for plain PPO)
    tx_policy: optax.GradientTransformation
    tx_value: optax.GradientTransformation
    policy_lr: Callable[[int], Any]  # the policy's schedule, by optimizer update
    new_state: Callable  # new_state(policy, value, rng_data) -> ppo_steps.PPOState
    rng_data: jax.Array
    shapes: ppo_steps.PPOState  # abstract state
    state_sh: ppo_steps.PPOState  # its shardings


def plan(config: Any, policy_cfg: ModelConfig, value_cfg: ModelConfig, mesh: Any, rules: Any) -> Plan:
    """Check the config, then the models, counts, optimizers (their schedules count optimizer updates:
    micro-batches / ``grad_accum_steps``) and the state's shapes and shardings. Allocates nothing."""
    check_config(config, mesh, rules)
    rollout_len = {
        "config.data.max_prompt_len + config.max_new_tokens": config.data.max_prompt_len + config.max_new_tokens
    }
    stage.check_lengths(policy_cfg, "policy", rollout_len)
    stage.check_lengths(value_cfg, "value and reward model", rollout_len)
    if config.ptx_coef > 0:
        stage.check_lengths(policy_cfg, "policy", {"config.data.ptx_len": config.data.ptx_len})
    models = ppo_steps.make_models(policy_cfg, value_cfg, config)
    total_steps = config.num_iterations or math.ceil(config.total_episodes / config.batch_size)
    minibatches = config.batch_size // config.minibatch_size
    micro_per_iteration = config.ppo_epochs * minibatches
    policy_updates = total_steps * micro_per_iteration // config.optim.grad_accum_steps
    value_updates = total_steps * micro_per_iteration // config.value_optim.grad_accum_steps
    tx_policy = optim.make_optimizer(config.optim, policy_updates)
    tx_value = optim.make_optimizer(config.value_optim, value_updates)
    new_state = ppo_steps.make_new_state(config, tx_policy, tx_value)
    rng_data = jax.random.key_data(jax.random.key(config.seed))
    shapes, state_sh = ppo_steps.abstract_state(new_state, models["policy"], models["value"], rng_data, mesh, rules)
    return Plan(
        models=models,
        policy_cfg=policy_cfg,
        value_cfg=value_cfg,
        total_steps=total_steps,
        minibatches=minibatches,
        micro_per_iteration=micro_per_iteration,
        policy_updates=policy_updates,
        value_updates=value_updates,
        ptx_rows=ppo_steps.ptx_rows_per_minibatch(config, sharding.batch_divisor(mesh, rules)),
        tx_policy=tx_policy,
        tx_value=tx_value,
        policy_lr=optim.lr_schedule(config.optim, policy_updates),
        new_state=new_state,
        rng_data=rng_data,
        shapes=shapes,
        state_sh=state_sh,
    )

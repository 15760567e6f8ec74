"""Stage 3, PPO and PPO-ptx (paper_spec §3): ``train(config, workdir)``.

Objective (Eq. 2): E_{x, y~π}[r_θ(x,y) - β·log(π(y|x)/π_SFT(y|x))] + γ·E_{x~pretrain}[log π(x)].

Four parameter sets share one mesh: the **policy** (trained; from ``config.policy_from``, the PPO-init
SFT), the frozen **reference** (the same checkpoint), the **value model** (trained, separate params,
initialised from the RM: ``config.rm_from``) and the frozen **RM** with its bias. The frozen two can be
stored in ``config.frozen_dtype`` (e.g. bfloat16). Dropout is off in all four (the first ratio is 1).

One iteration (one counted step of ``loop.run``):

1. **Generate** ``batch_size`` responses to training prompts at temperature 1 (``sampling.generate``).
2. **Score** (``rollout.score``): policy and reference log-probs, values, the RM score at the EOS minus
   the bias (the missing-EOS penalty if there is none), then per-token KL-shaped rewards, GAE
   (γ = 1, λ) and whitened advantages (``rollout.finish``).
3. **Update**: ``ppo_epochs`` passes over the rollout in shuffled minibatches. Each minibatch takes one
   Adam step of the policy on the clipped surrogate plus, for PPO-ptx, γ times the LM loss on
   ``ptx_ratio × minibatch`` pretraining rows (the two gradients summed, as the paper accumulates them),
   and one Adam step of the value model on the clipped value loss.
4. **KL coefficient**: fixed β (the paper: 0.02) or the adaptive controller of Ziegler et al.

Rerunning resumes exactly: policy, value, both optimizers, β, the prompt and pretraining iterators and
the RNG are in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from instructjax import checkpoint, evaluate, loop, losses, optim, reward, rollout, sampling, sharding
from instructjax.data import pipeline, tfds_builder
from instructjax.model import ModelConfig, Transformer, count_params, unembedding
from instructjax.tokenizer import load_tokenizer


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
    frozen = lambda cfg: Transformer(dataclasses.replace(cfg, dtype=config.frozen_dtype or cfg.dtype))  # noqa: E731
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
    """The jitted ``score(policy_params, value_params, frozen, batch, gen, kl_coef, oracle_scores) -> Rollout``:
    ``rollout.score`` of the generated responses, then KL-shaped rewards, GAE and whitening (``rollout.finish``)."""

    @jax.jit
    def score(policy_params, value_params, frozen, batch, gen, kl_coef, oracle_scores):
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
            oracle_scores=oracle_scores,
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
        logprobs, _ = rollout.response_logprobs(
            policy_model, params, tokens, mask, mb.prompt.shape[1], config.temperature
        )
        pg_loss, stats = losses.ppo_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.response_mask, config.clip_eps)
        stats["pg_loss"] = pg_loss
        loss = pg_loss
        if ptx is not None:  # PPO-ptx: γ · pretraining NLL, its gradient summed with the PPO gradient
            hidden = policy_model.apply({"params": params}, ptx["tokens"], segment_ids_bt=ptx["segment_ids"],
                                        return_hidden=True)  # fmt: skip
            ptx_loss, _ = losses.fused_lm_loss(
                hidden, unembedding(params, policy_cfg), ptx["tokens"], ptx["loss_mask"], config.loss_chunk
            )
            stats["ptx_loss"] = ptx_loss
            loss = loss + config.ptx_coef * ptx_loss
        return loss, stats

    def value_loss_fn(params, mb):
        tokens = jnp.concatenate([mb.prompt, mb.response], axis=1)
        mask = jnp.concatenate([mb.prompt_mask, mb.response_mask], axis=1)
        values = rollout.response_values(value_model, params, tokens, mask, mb.prompt.shape[1])
        loss, stats = losses.value_loss(values, mb.values, mb.returns, mb.response_mask, config.value_clip)
        return loss, {**stats, "value_loss": loss}

    def update(state: PPOState, ro: rollout.Rollout, rows: jax.Array, ptx: dict | None) -> tuple[PPOState, dict]:
        mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x[rows], sharding.batch_sharding(
            mesh, rules, x.ndim)), ro)  # fmt: skip
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


def train(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Run PPO (γ = ``config.ptx_coef`` = 0) or PPO-ptx; returns the summary (also ``summary.json``)."""
    # ----------------------------------------------------------------- Set-up: workdir, mesh, models
    wall_start = time.perf_counter()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not config.policy_from or not config.rm_from:
        raise ValueError(
            "config.policy_from (the PPO-init SFT workdir) and config.rm_from (the RM workdir) are required"
        )
    if config.reward not in ("rm", "gold"):
        raise ValueError(f"config.reward={config.reward!r}: expected 'rm' or 'gold'")
    if config.nan_policy != "stop":
        raise ValueError(f"config.nan_policy={config.nan_policy!r}: PPO supports only 'stop'")
    mesh, rules = sharding.make_mesh(config.mesh_shape), sharding.as_rules(config.rules)
    policy_source, rm_source = evaluate.stage_config(config.policy_from), evaluate.stage_config(config.rm_from)
    if jax.process_index() == 0:  # self-describing: the policy's model and data settings come along, so
        # evaluate.load_stage, scripts/sample.py and convert_hf read a PPO workdir like any other stage
        written = json.loads(config.to_json_best_effort())
        written["model"] = policy_source.model.to_dict()
        written["data"] = {**policy_source.data.to_dict(), **written["data"]}
        (workdir / "config.json").write_text(json.dumps(written, indent=1) + "\n")
    policy_cfg = dataclasses.replace(ModelConfig.from_dict(policy_source.model), dropout_rate=0.0)
    value_cfg = dataclasses.replace(ModelConfig.from_dict(rm_source.model), dropout_rate=0.0)
    if policy_cfg.head != "lm" or value_cfg.head != "scalar":
        raise ValueError(f"{config.policy_from} must hold a policy and {config.rm_from} a reward model")
    models = make_models(policy_cfg, value_cfg, config)
    policy_model, value_model = models["policy"], models["value"]
    frozen_dtype = jnp.dtype(config.frozen_dtype) if config.frozen_dtype else None
    rm_bias = reward.load_bias(config.rm_from)

    # ----------------------------------------------------------------- Data
    world = pathlib.Path(policy_source.data.world_dir)
    data = config.data
    tokenizer = load_tokenizer(policy_source.data.tokenizer or world / "tokenizer.json")
    cache = policy_source.data.cache_dir or world / "tfds"
    template = policy_source.data.prompt_template
    fmt = pipeline.TextFormat(tokenizer, policy_source.data.max_len, data.max_prompt_len, template)
    for name in ("batch_size", "minibatch_size"):
        sharding.check_batch_size(f"config.{name}", config[name], mesh, rules)
    if config.batch_size % config.minibatch_size:
        raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of minibatch_size")
    prompt_src = tfds_builder.build("prompts", {"train": world / data.prompts_file}, cache, data.skip_bad)["train"]
    block = sharding.batch_block(mesh, rules)  # this process's rows of every batch
    iters = {"prompts": iter(pipeline.prompt_batches(prompt_src, fmt, config.batch_size, config.seed, shard=block))}
    ptx_rows = ptx_rows_per_minibatch(config, sharding.batch_divisor(mesh, rules))
    if ptx_rows:
        ptx_src = tfds_builder.build("pretrain", {"train": world / data.pretrain_file}, cache)["train"]
        iters["ptx"] = iter(
            pipeline.pretrain_batches(ptx_src, tokenizer, data.ptx_len, ptx_rows, config.seed + 1, shard=block)
        )
    eval_prompts = [json.loads(line)["prompt"] for line in (world / data.eval_prompts_file).read_text().splitlines()]
    eval_prompts = eval_prompts[: config.eval_prompts]
    gold_score = _gold_scorer(world)
    if config.reward == "gold" and gold_score is None:
        raise ValueError(f"config.reward='gold' needs the synthetic world's gold score; {world} has no world.json")
    minibatches = config.batch_size // config.minibatch_size  # update steps per epoch (micro-batches)
    for name in ("optim", "value_optim"):
        if minibatches % config[name].grad_accum_steps:
            raise ValueError(
                f"config.{name}.grad_accum_steps={config[name].grad_accum_steps} must divide the {minibatches} "
                "minibatches of an epoch (an optimizer update may not span two rollouts)"
            )
    total_steps = config.num_iterations or math.ceil(config.total_episodes / config.batch_size)
    micro_per_iteration = config.ppo_epochs * minibatches
    # The schedules count optimizer updates: micro-batches / grad_accum_steps.
    policy_updates = total_steps * micro_per_iteration // config.optim.grad_accum_steps
    value_updates = total_steps * micro_per_iteration // config.value_optim.grad_accum_steps

    # ----------------------------------------------------------------- Sharded state: four parameter sets
    tx_policy = optim.make_optimizer(config.optim, policy_updates)
    policy_lr = optim.lr_schedule(config.optim, policy_updates)  # for the log
    tx_value = optim.make_optimizer(config.value_optim, value_updates)
    new_state = make_new_state(config, tx_policy, tx_value)
    rng_data = jax.random.key_data(jax.random.key(config.seed))
    shapes, state_sh = abstract_state(new_state, policy_model, value_model, rng_data, mesh, rules)
    # Straight from the checkpoints onto the mesh (no random init): the policy and reference from the
    # PPO-init SFT, the value model and the RM from the RM (both the selected, "best", params). The frozen
    # copies are separate arrays because the trained ones are donated every update.
    load_policy = lambda: checkpoint.load_params(config.policy_from, shapes.params, state_sh.params, best=True)  # noqa: E731
    load_rm = lambda: checkpoint.load_params(config.rm_from, shapes.value_params, state_sh.value_params, best=True)  # noqa: E731
    with sharding.use(mesh, rules):
        state = jax.jit(lambda p, v: new_state(p, v, rng_data), out_shardings=state_sh)(load_policy(), load_rm())
    frozen = {"ref": _cast(load_policy(), frozen_dtype), "rm": _cast(load_rm(), frozen_dtype)}
    n_params = count_params(state.params)

    # ----------------------------------------------------------------- Jitted pieces
    score = make_score(models, config, tokenizer.eos_id, rm_bias)
    update = make_update(models, policy_cfg, config, tx_policy, tx_value, mesh, rules, state_sh)
    new_kl_coef = jax.jit(lambda coef, kl: _kl_controller(config.kl, coef, kl, config.batch_size))

    # ----------------------------------------------------------------- One iteration
    time_split = {"generate": 0.0, "score": 0.0, "update": 0.0}  # seconds, summed over iterations
    timed = {"iterations": 0}

    def iteration(state: PPOState) -> tuple[PPOState, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        gen_rng, perm_rng = jax.random.split(rng)
        t0 = time.perf_counter()
        batch = sharding.to_global(next(iters["prompts"]), mesh, rules)
        gen = sampling.generate(
            state.params, policy_cfg, batch["prompt"], batch["prompt_mask"], gen_rng,
            max_new_tokens=config.max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
            temperature=config.temperature,
        )  # fmt: skip
        jax.block_until_ready(gen)
        t1 = time.perf_counter()
        golds = None if gold_score is None else _gold_scores(batch, gen, gold_score, tokenizer)
        oracle = None
        if config.reward == "gold":  # the ablation: optimise the gold score itself instead of the RM
            oracle = sharding.put_global(np.asarray(golds, np.float32), mesh, rules)
        ro = score(state.params, state.value_params, frozen, batch, gen, state.kl_coef, oracle)
        stats = _rollout_stats(ro, golds)
        t2 = time.perf_counter()
        updates = []
        for epoch in range(config.ppo_epochs):
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(perm_rng, epoch), config.batch_size))
            for i in range(minibatches):
                ptx = sharding.to_global(next(iters["ptx"]), mesh, rules) if "ptx" in iters else None
                rows = jnp.asarray(perm[i * config.minibatch_size : (i + 1) * config.minibatch_size])
                state, mb_out = update(state, ro, rows, ptx)
                updates.append(mb_out)
        state = state.replace(step=state.step + 1, kl_coef=new_kl_coef(state.kl_coef, stats["kl"]))
        jax.block_until_ready(state)
        t3 = time.perf_counter()
        # Means over the iteration's minibatch updates; finite only if every update was.
        out = {k: float(np.mean([u[k] for u in updates])) for k in updates[0] if k != "finite"}
        out["finite"] = all(bool(u["finite"]) for u in updates)
        out.update(stats, kl_coef=float(state.kl_coef), loss=out["pg_loss"])
        out.update(time_generate=t1 - t0, time_score=t2 - t1, time_update=t3 - t2)
        if timed["iterations"]:  # this process's first iteration compiles: not part of the time split
            for key in time_split:
                time_split[key] += out[f"time_{key}"]
        timed["iterations"] += 1
        tokens = config.batch_size * (batch["prompt"].shape[1] + config.max_new_tokens)
        out["real_tokens"] = stats["response_length"] * config.batch_size
        out["computed_tokens"] = tokens
        return state, out

    def evaluate_policy(params) -> dict[str, float]:
        stage = evaluate.Stage(config, policy_cfg, params, tokenizer, mesh, rules)
        responses = evaluate.sample_texts(
            stage, eval_prompts, max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size,
            template=template,
        )  # fmt: skip
        texts, stopped = zip(*responses, strict=True)
        rm_stage = dataclasses.replace(stage, config=rm_source, model_cfg=value_cfg, params=frozen["rm"])
        rm = reward.RewardModel(rm_stage, rm_bias)
        result = {"val_rm_score": float(np.mean(reward.score_texts(rm, eval_prompts, texts, stopped)))}
        if gold_score is not None:
            golds = [gold_score(p, t, s) for p, t, s in zip(eval_prompts, texts, stopped, strict=True)]
            result["val_gold_score"] = float(np.mean(golds))
        return result

    # ----------------------------------------------------------------- Train loop (instructjax/loop.py)
    with sharding.use(mesh, rules):
        result = loop.run(
            config,
            workdir,
            state=state,
            state_shardings=state_sh,
            iters=iters,
            step_fn=iteration,
            evaluate=evaluate_policy,
            total_steps=total_steps,
            select=("val_rm_score", "max"),
            start_info={"params": n_params, "ptx_rows_per_minibatch": ptx_rows, "minibatches": minibatches},
            lr_fn=lambda it: policy_lr(it * micro_per_iteration // config.optim.grad_accum_steps),
            flops_per_token=0.0,
            started_at=wall_start,
            eval_at_start=True,
            progress_keys=("rm_score", "gold_score", "kl", "ptx_loss"),
        )

    # ----------------------------------------------------------------- Finish
    total = max(sum(time_split.values()), 1e-9)
    split = {k: round(v / total, 3) for k, v in time_split.items()}
    print(f"[ppo] time split (after compilation): {split}")
    summary = loop.summary(result, total_steps, params=n_params, time_split=split, truncation=fmt.stats.as_dict())
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _cast(params: Any, dtype: Any) -> Any:
    return params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), params)


def _kl_controller(kl: Any, coef: jax.Array, observed_kl: jax.Array, batch_size: int) -> jax.Array:
    """Fixed β, or the adaptive controller (Ziegler et al. §2.2; paper_spec §3.3):

    e = clip(KL / KL_target - 1, -0.2, 0.2),   β ← β · (1 + e · batch_size / horizon)
    """
    if kl.mode == "fixed":
        return coef
    if kl.mode != "adaptive":
        raise ValueError(f"config.kl.mode={kl.mode!r}: expected 'fixed' or 'adaptive'")
    error = jnp.clip(observed_kl / kl.target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * batch_size / kl.horizon)


def _gold_scorer(world: pathlib.Path):
    """``world.gold_score`` when the data is the synthetic world's, else None."""
    if not (world / "world.json").exists():
        return None
    from instructjax.data import world as world_module

    return world_module.gold_score


def _gold_scores(batch: dict, gen: Any, gold_score, tokenizer) -> list[float]:
    """The world's gold score of each sampled response of the global batch (on every process); the prompt
    is decoded from its tokens (the world's template is ``{prompt}``, so that is the prompt text)."""
    golds = []
    for p, r in zip(*sharding.to_host((batch["prompt"], gen.tokens)), strict=True):
        text, stopped = tokenizer.decode_response(r.tolist())
        golds.append(gold_score(tokenizer.decode(p.tolist()), text, stopped))
    return golds


def _rollout_stats(ro: rollout.Rollout, golds: list[float] | None) -> dict[str, float]:
    """Per-iteration rollout metrics (host floats)."""
    ro = sharding.to_host(ro)
    mask = np.asarray(ro.response_mask, np.float32)
    logratio = np.asarray(ro.logprobs) - np.asarray(ro.ref_logprobs)
    returns, values = np.asarray(ro.returns)[mask > 0], np.asarray(ro.values)[mask > 0]
    stats = {
        "rm_score": float(np.mean(ro.scores)),
        "kl": float(np.mean((logratio * mask).sum(axis=1))),  # Σ_t log π/π_ref, the sequence KL estimate
        "entropy": float((np.asarray(ro.entropy) * mask).sum() / max(mask.sum(), 1.0)),
        "response_length": float(mask.sum(axis=1).mean()),
        "stop_rate": float(np.mean(ro.stopped)),
        "explained_variance": float(1.0 - np.var(returns - values) / max(np.var(returns), 1e-8)),
    }
    if golds is not None:
        stats["gold_score"] = float(np.mean(golds))
    return stats

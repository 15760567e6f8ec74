"""Stage 3, PPO and PPO-ptx (Ouyang et al. 2022, §3.5, App. C.4): ``train(config, workdir)``.

Objective (Eq. 2 of §3.5): E_{x, y~π}[r_θ(x,y) - β·log(π(y|x)/π_SFT(y|x))] + γ·E_{x~pretrain}[log π(x)].

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
4. **KL coefficient**: fixed β (the paper: 0.02) or the adaptive controller of Ziegler et al. 2019 (§2.2).

Set-up is one function, ``ppo_setup.plan`` (config checks, models, counts, optimizers, state shapes and
shardings), which ``train`` and the ahead-of-time compilation (``aot.py``) both call. ``make_iteration`` and
``make_evaluate`` build the iteration and the validation that ``loop.run`` drives. Checkpoint selection
keeps the params with the highest ``val_reward``: the mean validation reward as training gives it (the RM
score with the missing-EOS penalty; the gold score when ``config.reward='gold'``).

Rerunning resumes exactly: policy, value, both optimizers, β, the prompt and pretraining iterators and
the RNG are in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instructjax import (
    checkpoint,
    loop,
    ppo_setup,
    ppo_steps,
    reward,
    reward_fns,
    rollout,
    sampling,
    sharding,
    stage,
    workdir_lock,
)
from instructjax.data import pipeline, tfds_builder, world_tasks
from instructjax.model import ModelConfig, count_params


@dataclasses.dataclass
class Data:
    """PPO's data: the prompt (and, for PPO-ptx, pretraining) iterators, checkpointed; the validation prompts;
    the tokenizer and prompt template of the policy's stage; the world's gold score (None outside it); the
    reward (``config.reward`` parsed, ``reward_fns``)."""

    iters: dict[str, Any]
    eval_prompts: list[str]
    tokenizer: Any
    template: str
    fmt: pipeline.TextFormat
    gold_score: Callable[[str, str, bool], float] | None
    reward: reward_fns.Reward


def make_data(config: Any, plan: ppo_setup.Plan, policy_source: Any, opened: stage.Opened) -> Data:
    """Prompts from the policy's data directory (``config.data.prompts_file``), PPO-ptx's packed pretraining
    rows, and the first ``config.eval_prompts`` validation prompts."""
    mesh, rules, paths, tokenizer, d = opened.mesh, opened.rules, opened.paths, opened.tokenizer, config.data
    template = policy_source.data.prompt_template
    fmt = pipeline.TextFormat(tokenizer, policy_source.data.max_len, d.max_prompt_len, template)
    prompt_src = tfds_builder.build("prompts", {"train": paths.world / d.prompts_file}, paths.cache, d.skip_bad)
    block = sharding.batch_block(mesh, rules)  # this process's rows of every batch
    per_batch = config.batch_size // config.get("samples_per_prompt", 1)  # prompts per iteration
    prompts = pipeline.prompt_batches(prompt_src["train"], fmt, per_batch, config.seed, shard=block)
    iters = {"prompts": iter(prompts)}
    if plan.ptx_rows:
        ptx_src = tfds_builder.build("pretrain", {"train": paths.world / d.pretrain_file}, paths.cache)["train"]
        ptx = pipeline.pretrain_batches(ptx_src, tokenizer, d.ptx_len, plan.ptx_rows, config.seed + 1, shard=block)
        iters["ptx"] = iter(ptx)
    lines = (paths.world / d.eval_prompts_file).read_text().splitlines()
    eval_prompts = [json.loads(line)["prompt"] for line in lines][: config.eval_prompts]
    gold_score = world_tasks.gold_score if paths.synthetic else None
    gold = reward_fns.batch_of(gold_score) if gold_score else None
    try:
        reward_spec = reward_fns.parse(config.reward, gold=gold)
    except reward_fns.RewardError as e:
        raise ValueError(f"config.reward={config.reward!r}: {e} ({paths.world})") from None
    return Data(iters, eval_prompts, tokenizer, template, fmt, gold_score, reward_spec)


# ----------------------------------------------------------------------------------------------- the stage


@dataclasses.dataclass
class Session:
    """PPO set up once (``setup``): what ``train`` drives with ``loop.run``, and what a notebook drives one
    iteration at a time (``ppo_session``: ``step``, ``set_kl_coef``, ``set_reward``, ``rollout_samples``,
    ``save``)."""

    config: Any
    opened: stage.Opened
    plan: ppo_setup.Plan
    data: Data
    programs: Programs
    frozen: dict[str, Any]
    rm: reward.RewardModel
    state: ppo_steps.PPOState
    iteration: Callable[[ppo_steps.PPOState], tuple[ppo_steps.PPOState, dict]]
    evaluate: Callable[[Any], dict[str, float]]
    time_split: dict[str, float]
    last: dict[str, Any]  # the last iteration's host rollout (``last['rollout']``)
    history: list[dict]  # metrics of each iteration run by ``step``
    n_params: int


def setup(config: Any, workdir: str | pathlib.Path, *, reward_spec: Any = None) -> Session:
    """Everything ``train`` does before its loop: config checks, the workdir, mesh, plan, data, the four
    parameter sets loaded onto the mesh, the jitted programs, one iteration and the evaluation.
    ``reward_spec`` (a ``reward_fns`` spec: a string, a callable or a ``Reward``) replaces ``config.reward``."""
    # ----------------------------------------------------------------- Sources, workdir, mesh, plan
    if not config.policy_from or not config.rm_from:
        raise ValueError(
            "config.policy_from (the PPO-init SFT workdir) and config.rm_from (the RM workdir) are required"
        )
    policy_source, rm_source = stage.read_config(config.policy_from), stage.read_config(config.rm_from)
    policy_cfg, value_cfg = ppo_setup.model_configs(
        policy_source.model,
        rm_source.model,
        (f"config.policy_from={config.policy_from}", f"config.rm_from={config.rm_from}"),
        config.get("compute_dtype", ""),
    )
    # Self-describing: the policy's model and data settings come along, so stage.load_stage, scripts/sample.py
    # and convert_hf read a PPO workdir like any other stage.
    written = json.loads(config.to_json_best_effort())
    written["model"] = policy_source.model.to_dict()
    written["data"] = {**policy_source.data.to_dict(), **written["data"]}
    opened = stage.open_stage(config, workdir, data=policy_source.data, written=written)
    ppo_setup.check_same_tokenizer(
        opened.tokenizer, stage.data_paths(rm_source.data, need_data=False).tokenizer, config
    )
    mesh, rules = opened.mesh, opened.rules
    ppo = ppo_setup.plan(config, policy_cfg, value_cfg, mesh, rules)

    # ----------------------------------------------------------------- Data (and the reward)
    data = make_data(config, ppo, policy_source, opened)
    if reward_spec is not None:
        data = dataclasses.replace(data, reward=parse_reward(reward_spec, data))

    # ----------------------------------------------------------------- Sharded state: four parameter sets
    # Straight from the checkpoints onto the mesh (no random init): the policy and reference from the
    # PPO-init SFT, the value model and the RM from the RM (both the selected, "best", params). The frozen
    # copies are separate arrays because the trained ones are donated every update.
    shapes, state_sh = ppo.shapes, ppo.state_sh
    load_policy = lambda: checkpoint.load_params(config.policy_from, shapes.params, state_sh.params, best=True)
    load_rm = lambda: checkpoint.load_params(config.rm_from, shapes.value_params, state_sh.value_params, best=True)
    with sharding.use(mesh, rules):
        new_state = jax.jit(lambda p, v: ppo.new_state(p, v, ppo.rng_data), out_shardings=state_sh)
        state = new_state(load_policy(), load_rm())
    frozen_dtype = jnp.dtype(config.frozen_dtype) if config.frozen_dtype else None
    frozen = {"ref": _cast(load_policy(), frozen_dtype), "rm": _cast(load_rm(), frozen_dtype)}
    rm_bias = reward.load_bias(config.rm_from)

    # ----------------------------------------------------------------- Jitted pieces, one iteration, evaluation
    programs = Programs(
        score=ppo_steps.make_score(ppo.models, config, data.tokenizer.eos_id, rm_bias),
        update=ppo_steps.make_update(
            ppo.models, policy_cfg, config, ppo.tx_policy, ppo.tx_value, mesh, rules, state_sh
        ),
        new_kl_coef=jax.jit(lambda coef, kl: ppo_steps.kl_controller(config.kl, coef, kl, config.batch_size)),
    )
    time_split = {"generate": 0.0, "score": 0.0, "update": 0.0}  # seconds after compilation, summed
    last: dict[str, Any] = {}
    iteration = make_iteration(config, ppo, data, programs, frozen, mesh, rules, time_split, last)
    rm = reward.RewardModel(stage.Stage(rm_source, value_cfg, frozen["rm"], data.tokenizer, mesh, rules), rm_bias)
    evaluate = make_evaluate(config, policy_cfg, data, rm, mesh, rules)
    n_params = count_params(state.params)
    return Session(
        config, opened, ppo, data, programs, frozen, rm, state, iteration, evaluate, time_split, last, [], n_params
    )


def train(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Run PPO (γ = ``config.ptx_coef`` = 0) or PPO-ptx; returns the summary (also ``summary.json``)."""
    wall_start = time.perf_counter()
    with workdir_lock.hold(workdir):  # one run per workdir, released however the stage ends
        # ----------------------------------------------------------------- Set-up (``setup``)
        session = setup(config, workdir)
        ppo, data = session.plan, session.data

        # ----------------------------------------------------------------- Train loop (instructjax/loop.py)
        settings = loop.settings(
            config,
            total_steps=ppo.total_steps,
            select=(VALIDATION_REWARD, "max"),
            eval_at_start=True,
            progress_keys=("rm_score", "gold_score", "kl", "ptx_loss"),
        )
        start_info = {
            "params": session.n_params,
            "ptx_rows_per_minibatch": ppo.ptx_rows,
            "minibatches": ppo.minibatches,
        }
        with sharding.use(session.opened.mesh, session.opened.rules):
            result = loop.run(
                settings,
                session.opened.workdir,
                state=session.state,
                state_shardings=ppo.state_sh,
                iters=data.iters,
                step_fn=session.iteration,
                evaluate=session.evaluate,
                start_info=start_info,
                lr_fn=lambda it: ppo.policy_lr(it * ppo.micro_per_iteration // config.optim.grad_accum_steps),
                started_at=wall_start,
            )

        # ----------------------------------------------------------------- Finish
        total = max(sum(session.time_split.values()), 1e-9)
        split = {k: round(v / total, 3) for k, v in session.time_split.items()}
        print(f"[ppo] time split (after compilation): {split}")
        truncation = data.fmt.stats.as_dict()
        summary = loop.summary(
            result, ppo.total_steps, params=session.n_params, time_split=split, truncation=truncation
        )
        return stage.close_stage(session.opened.workdir, summary)


def parse_reward(reward_spec: Any, data: Data) -> reward_fns.Reward:
    """A ``reward_fns`` spec against this data (``'gold'`` needs the synthetic world's gold score)."""
    gold = reward_fns.batch_of(data.gold_score) if data.gold_score else None
    return reward_fns.parse(reward_spec, gold=gold)


# ----------------------------------------------------------------------------------------------- one iteration


@dataclasses.dataclass(frozen=True)
class Programs:
    """The jitted pieces of an iteration besides generation."""

    score: Callable  # make_score
    update: Callable  # make_update
    new_kl_coef: Callable  # (β, observed KL) -> β


def make_iteration(
    config: Any,
    plan: ppo_setup.Plan,
    data: Data,
    programs: Programs,
    frozen: dict[str, Any],
    mesh: Any,
    rules: Any,
    time_split: dict[str, float],
    last: dict[str, Any] | None = None,
) -> Callable[[ppo_steps.PPOState], tuple[ppo_steps.PPOState, dict]]:
    """``iteration(state) -> (state, metrics)``, one counted step of ``loop.run``: generate, score (KL-shaped
    rewards, GAE), ``ppo_epochs`` passes of shuffled minibatch updates, then the β update. After this process's
    first iteration (which compiles), each phase's seconds are added to ``time_split``; ``last['rollout']``
    keeps the host copy of the latest rollout (already made for the metrics: no extra transfer)."""
    policy_cfg, tokenizer, iters = plan.policy_cfg, data.tokenizer, data.iters
    timed = {"iterations": 0}
    samples_per_prompt = config.get("samples_per_prompt", 1)
    # The prompt arrays [B/K, P] and row_valid [B/K], repeated into batch-sharded [B, ...] (K = samples_per_prompt)
    repeat_k = functools.partial(jnp.repeat, repeats=samples_per_prompt, axis=0)
    repeat = {ndim: jax.jit(repeat_k, out_shardings=sharding.batch_sharding(mesh, rules, ndim)) for ndim in (1, 2)}
    repeat_rows = lambda b: {k: repeat[v.ndim](v) for k, v in b.items()}
    decode_params = decode_layout(config, plan, mesh)

    def iteration(state: ppo_steps.PPOState) -> tuple[ppo_steps.PPOState, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        gen_rng, perm_rng = jax.random.split(rng)
        t0 = time.perf_counter()
        batch = sharding.to_global(next(iters["prompts"]), mesh, rules)
        gen = sampling.generate(
            decode_params(state.params),
            policy_cfg,
            batch["prompt"],
            batch["prompt_mask"],
            gen_rng,
            max_new_tokens=config.max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            temperature=config.temperature,
            samples_per_prompt=samples_per_prompt,
        )
        if samples_per_prompt > 1:  # episode i·K + j is prompt i's j-th sample: its prompt row, repeated
            batch = repeat_rows(batch)
        jax.block_until_ready(gen)
        t1 = time.perf_counter()
        reward_spec, golds, host = data.reward, None, None
        if data.gold_score is not None or reward_spec.host_terms:  # texts: for the gold score, reward functions
            prompts, responses, stopped = _texts(batch, gen, tokenizer)
            if data.gold_score is not None:
                golds = [data.gold_score(p, r, s) for p, r, s in zip(prompts, responses, stopped, strict=True)]
            where = f"PPO iteration {int(state.step) + 1}"
            host = reward_fns.host_scores(reward_spec, prompts, responses, stopped, where)
        if host is not None:  # the reward functions' sum (the gold ablation: the gold score alone)
            host = sharding.put_global(host.astype(np.float32), mesh, rules)
        ro = programs.score(
            state.params, state.value_params, frozen, batch, gen, state.kl_coef, host, rm_weight=reward_spec.rm_weight
        )
        host = sharding.to_host(ro)
        check_rollout_finite(host, int(state.step) + 1)  # before any update: the last checkpoint stays good
        stats = _rollout_stats(host, golds)
        if last is not None:
            last["rollout"] = host
        t2 = time.perf_counter()
        updates = []
        for epoch in range(config.ppo_epochs):
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(perm_rng, epoch), config.batch_size))
            for i in range(plan.minibatches):
                ptx = sharding.to_global(next(iters["ptx"]), mesh, rules) if "ptx" in iters else None
                rows = jnp.asarray(perm[i * config.minibatch_size : (i + 1) * config.minibatch_size])
                state, mb_out = programs.update(state, ro, rows, ptx)
                updates.append(mb_out)
        state = state.replace(step=state.step + 1, kl_coef=programs.new_kl_coef(state.kl_coef, stats["kl"]))
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
        out["real_tokens"] = stats["response_length"] * config.batch_size
        out["computed_tokens"] = config.batch_size * (batch["prompt"].shape[1] + config.max_new_tokens)
        return state, out

    return iteration


def decode_layout(config: Any, plan: ppo_setup.Plan, mesh: Any) -> Callable[[Any], Any]:
    """The policy's params as generation reads them (``config.decode_layout``): 'replicated' (the default)
    gathers them once per iteration into ``sharding.decode_shardings``' layout, whole over data and fsdp and
    stored in the compute dtype, so the decode loop does not all-gather every weight at every step
    (docs/scaling.md); 'train' decodes from the training layout. Nothing to do where data × fsdp is 1."""
    if not sharding.reshards_for_decoding(config.get("decode_layout", "replicated"), mesh):
        return lambda params: params
    return sharding.to_decode_layout(plan.state_sh.params, plan.policy_cfg.dtype)


# ----------------------------------------------------------------------------------------------- evaluation

# The validation metric that keeps ``workdir/best``: the score training optimises (``validation_reward``).
VALIDATION_REWARD = "val_reward"


def validation_reward(
    config: Any, reward_spec: reward_fns.Reward, rm_scores: Any, stopped: Any, host: Any | None
) -> float:
    """The mean reward training would give the validation responses, so that checkpoint selection optimises
    what PPO optimises, as ``rollout.score`` computes it: ``rm_weight`` × the normalised RM score (replaced by
    the missing-EOS penalty for a response without EOS, when ``config.use_missing_eos_penalty``) plus the
    reward functions' sum ``host`` (the gold score alone for ``config.reward='gold'``). (``val_rm_score``,
    logged beside it, is the RM's score alone.)"""
    scores = np.zeros(len(stopped), np.float64)
    if reward_spec.rm_weight:
        scores = np.asarray(rm_scores, np.float64)
        if config.use_missing_eos_penalty:
            scores = np.where(np.asarray(stopped, bool), scores, config.missing_eos_penalty)
        if reward_spec.rm_weight != 1.0:
            scores = reward_spec.rm_weight * scores
        if host is not None:
            scores = scores + host
    elif host is not None:
        scores = np.asarray(host, np.float64)
    return float(np.mean(scores))


def make_evaluate(
    config: Any, policy_cfg: ModelConfig, data: Data, rm: reward.RewardModel, mesh: Any, rules: Any
) -> Callable[[Any], dict[str, float]]:
    """``evaluate(params)``: greedy responses to the validation prompts, scored by the frozen RM (and the gold
    score in the synthetic world); ``val_reward`` (``validation_reward``) selects the best checkpoint."""

    def evaluate(params: Any) -> dict[str, float]:
        policy = stage.Stage(config, policy_cfg, params, data.tokenizer, mesh, rules)
        prompts = data.eval_prompts
        responses = stage.sample_texts(
            policy,
            prompts,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.eval_batch_size,
            template=data.template,
        )
        texts, stopped = zip(*responses, strict=True)
        scores = reward.score_texts(rm, prompts, texts, stopped)
        result = {"val_rm_score": float(np.mean(scores))}
        if data.gold_score is not None:
            golds = [data.gold_score(p, t, s) for p, t, s in zip(prompts, texts, stopped, strict=True)]
            result["val_gold_score"] = float(np.mean(golds))
        templated = [data.template.format(prompt=p) for p in prompts]  # as the policy read them, like training's
        host = reward_fns.host_scores(data.reward, templated, texts, stopped, "PPO evaluation")
        result[VALIDATION_REWARD] = validation_reward(config, data.reward, scores, stopped, host)
        return result

    return evaluate


def _cast(params: Any, dtype: Any) -> Any:
    return params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), params)


def _texts(batch: dict, gen: Any, tokenizer) -> tuple[list[str], list[str], list[bool]]:
    """The global batch's prompts (decoded from their tokens: the text the policy read, its template applied),
    responses (cut at the first EOS) and whether each stopped, on every process."""
    prompts, responses, stopped = [], [], []
    for p, r in zip(*sharding.to_host((batch["prompt"], gen.tokens)), strict=True):
        text, stop = tokenizer.decode_response(r.tolist())
        prompts.append(tokenizer.decode(p.tolist()))
        responses.append(text)
        stopped.append(stop)
    return prompts, responses, stopped


# The rollout's quantities, in the order a NaN spreads through them (the first non-finite one is its source).
ROLLOUT_QUANTITIES = (
    ("logprobs", "the policy's log-probs"),
    ("ref_logprobs", "the reference's log-probs"),
    ("values", "the value model's values"),
    ("scores", "the reward (RM score or reward function)"),
    ("rewards", "the KL-shaped rewards"),
    ("advantages", "the advantages"),
    ("returns", "the returns"),
)


def check_rollout_finite(ro: rollout.Rollout, iteration: int) -> None:
    """Raise ``FloatingPointError`` naming the iteration and the first non-finite quantity of a (host) rollout,
    where the response mask is 1 (padding is masked out everywhere), before any update uses it: PPO stops
    there (``nan_policy='stop'``), and the last checkpoint, written before this iteration, stays intact."""
    mask = np.asarray(ro.response_mask) > 0
    for name, what in ROLLOUT_QUANTITIES:
        values = np.asarray(getattr(ro, name))
        real = values if values.ndim == 1 else values[mask]  # scores are one per row
        bad = ~np.isfinite(real)
        if bad.any():
            example = real[bad][0]
            raise FloatingPointError(
                f"non-finite {name} ({what}) in the rollout of iteration {iteration}: {int(bad.sum())} of "
                f"{real.size} entries, e.g. {example}; the run stops before updating (the last checkpoint is intact)"
            )


def _rollout_stats(ro: rollout.Rollout, golds: list[float] | None) -> dict[str, float]:
    """Per-iteration rollout metrics (host floats) of a rollout on the host."""
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

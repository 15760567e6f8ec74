"""Measure trained policies: samples on held-out prompts, the synthetic world's gold score, the RM's score,
KL to a reference and the alignment tax; the paper's comparison of models (``compare_models``).

Loading a stage and sampling from it are ``stage.load_stage`` and ``stage.sample_texts``; the gold score
(``world_tasks.gold_score``) stands in for the paper's human evaluation.
"""

from __future__ import annotations

import functools
import pathlib
import random
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from instructjax import losses, reward, sampling, scoring, sharding
from instructjax.data import pipeline, tfds_builder, world, world_tasks
from instructjax.model import Transformer
from instructjax.stage import Stage, load_stage, prompt_batches, sample_texts


def gold_eval(stage: Stage, prompts: Sequence[str], gold: bool = True, **sample_kwargs: Any) -> dict[str, Any]:
    """Mean gold score, stop rate and response length on ``prompts`` (greedy unless told otherwise),
    with every (prompt, response, gold) for the report. ``gold_by_family`` is the mean gold score per
    task family (a prompt's first word), where the reward model's skill differs most. ``gold=False``
    (data that is not the synthetic world, which has no gold score) leaves the gold entries out."""
    responses = sample_texts(stage, prompts, **sample_kwargs)
    rows = [
        {"prompt": p, "response": text, "stopped": stopped}
        for p, (text, stopped) in zip(prompts, responses, strict=True)
    ]
    gold_entries = {}
    if gold:
        by_family: dict[str, list[float]] = {}
        for row in rows:
            row["gold"] = world_tasks.gold_score(row["prompt"], row["response"], row["stopped"])
            by_family.setdefault(row["prompt"].split()[0], []).append(row["gold"])
        gold_entries = {
            "gold_score": float(np.mean([r["gold"] for r in rows])),
            "gold_by_family": {family: float(np.mean(g)) for family, g in sorted(by_family.items())},
        }
    return {
        **gold_entries,
        "stop_rate": float(np.mean([r["stopped"] for r in rows])),
        "response_words": float(np.mean([len(r["response"].split()) for r in rows])),
        "samples": rows,
    }


def pretrain_nll(
    stage: Stage,
    text_file: str | pathlib.Path,
    seq_len: int = 128,
    batches: int = 8,
    cache_dir: str | pathlib.Path | None = None,
) -> float:
    """Mean next-token NLL on held-out pretraining text: the alignment-tax probe (lower is better). The text's
    TFDS cache goes to ``cache_dir``, else the stage's, else beside the text (an imported model names none)."""
    cache = cache_dir or stage.config.data.get("cache_dir") or pathlib.Path(text_file).parent / "tfds"
    seq_len = min(seq_len, stage.model_cfg.max_len)  # rows longer than the model's context would read junk
    source = tfds_builder.build("pretrain", {"heldout": text_file}, cache)["heldout"]
    divisor = sharding.batch_divisor(stage.mesh, stage.rules)
    block = sharding.batch_block(stage.mesh, stage.rules)
    rows = 2 * divisor * -(-8 // divisor)
    it = iter(pipeline.pretrain_batches(source, stage.tokenizer, seq_len, rows, 0, shard=block))
    model = Transformer(stage.model_cfg)

    @jax.jit
    def nll(params, batch):
        logits = model.apply({"params": params}, batch["tokens"], segment_ids_bt=batch["segment_ids"])
        return losses.lm_loss(logits, batch["tokens"], batch["loss_mask"])

    total = count = 0.0
    with sharding.use(stage.mesh, stage.rules):
        for _ in range(batches):
            loss, n = nll(stage.params, sharding.to_global(next(it), stage.mesh, stage.rules))
            total, count = total + float(loss) * float(n), count + float(n)
    return total / count


def rm_agreement(
    rm: Any, policy: Stage, prompts: Sequence[str], samples_per_prompt: int = 8, min_gap: float = 0.2, seed: int = 0
) -> dict[str, Any]:
    """How well a reward model orders the policy's *own* samples, which is what PPO needs of it.

    Draws ``samples_per_prompt`` responses per prompt at temperature 1 and, over every pair of one prompt's
    samples whose gold scores differ by more than ``min_gap``, counts how often the RM (``reward.RewardModel``)
    prefers the one with the higher gold score. Returns the overall share, the share per task family (the
    prompt's first word), the number of pairs and the samples' mean gold score. 0.5 is chance.
    """
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    responses = sample_texts(policy, repeated, temperature=1.0, batch_size=512, seed=seed)
    texts, stopped = zip(*responses, strict=True)
    scores = reward.score_texts(rm, repeated, texts, stopped, batch_size=512).reshape(len(prompts), -1)
    gold = np.asarray([world_tasks.gold_score(p, t, s) for p, t, s in zip(repeated, texts, stopped, strict=True)])
    gold = gold.reshape(len(prompts), -1)
    agree: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        family = agree.setdefault(prompt.split()[0], [0, 0])
        for a in range(samples_per_prompt):
            for b in range(samples_per_prompt):
                if gold[i, a] > gold[i, b] + min_gap:
                    family[0] += int(scores[i, a] > scores[i, b])
                    family[1] += 1
    correct, total = sum(v[0] for v in agree.values()), sum(v[1] for v in agree.values())
    return {
        "agreement": correct / max(total, 1),
        "pairs": total,
        "by_family": {k: v[0] / max(v[1], 1) for k, v in sorted(agree.items())},
        "gold_score": float(gold.mean()),
    }


def label_policy_samples(
    policy: Stage,
    prompts: Sequence[str],
    *,
    k_min: int = 4,
    k_max: int = 9,
    labeler_temperature: float | None = None,
    seed: int = 0,
    mix_with: dict[str, Sequence[str]] | None = None,
    mix_keep: int = 5,
) -> list[dict]:
    """Comparison rows as the paper collected them: K samples of the policy per prompt (temperature 1),
    ranked by a simulated labeler of the synthetic world (``world.simulated_ranking``).

    K is drawn in ``k_min..k_max``; samples that did not stop (no EOS) are dropped, since comparison
    completions are written with an EOS; a prompt left with fewer than two distinct texts is skipped.
    ``mix_with`` (prompt -> completions, e.g. of the comparisons the RM was trained on) puts the first
    ``mix_keep`` of a prompt's other completions in the same row, ahead of the policy's samples, at most
    ``k_max`` in all: the paper's rankings compared outputs of several policies at once, so a policy's
    answers get ranked against better ones, not only against each other.
    """
    temperature = world.LABELER_TEMPERATURE if labeler_temperature is None else labeler_temperature
    rng = random.Random(seed)
    repeated = [p for p in prompts for _ in range(k_max)]
    responses = sample_texts(policy, repeated, temperature=1.0, batch_size=512, seed=seed)
    rows = []
    for i, prompt in enumerate(prompts):
        texts = [t for t, stopped in responses[i * k_max : (i + 1) * k_max] if stopped][: rng.randint(k_min, k_max)]
        if mix_with:
            texts = list(dict.fromkeys([*mix_with.get(prompt, ())[:mix_keep], *texts]))[:k_max]
        if len(set(texts)) < 2:
            continue
        ranking = world.simulated_ranking(prompt, texts, rng, temperature)
        rows.append({"prompt": prompt, "completions": texts, "ranking": [g[0] if len(g) == 1 else g for g in ranking]})
    return rows


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Share of prompts where ``scores`` beats ``baseline``, ties counting half (the paper's win rate)."""
    a, b = np.asarray(scores, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_rate needs paired scores, got shapes {a.shape} and {b.shape}")
    return float(np.mean((a > b) + 0.5 * (a == b)))


def kl_estimate(
    stage: Stage,
    reference: Stage,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[float, float]:
    """KL(π ‖ π_ref) per response, estimated on π's own samples at temperature 1, and its standard error:

        KL ≈ mean over prompts x, y ~ π(·|x) of Σ_t [log π(y_t | x, y_<t) - log π_ref(y_t | x, y_<t)]

    (the quantity PPO's β penalises), with the standard error std / √(prompts) over the per-prompt sums: one
    sample per prompt makes the estimate noisy, and the error says how many of its decimals mean something
    (another ``seed`` or ``batch_size`` draws other samples). Both log-probs come from one full forward each;
    the two stages must share a tokenizer and a mesh.
    """
    tok = stage.tokenizer
    total, rows, rng = 0.0, [], jax.random.key(seed)
    with sharding.use(stage.mesh, stage.rules):
        for start, n, prompt, prompt_mask in prompt_batches(stage, prompts, batch_size):
            gen = sampling.generate(
                stage.params,
                stage.model_cfg,
                prompt,
                prompt_mask,
                jax.random.fold_in(rng, start),
                max_new_tokens=max_new_tokens,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                temperature=1.0,
            )
            per_row = _sequence_kl(
                stage.params,
                reference.params,
                prompt,
                prompt_mask,
                gen.tokens,
                gen.mask,
                cfg=stage.model_cfg,
                ref_cfg=reference.model_cfg,
            )
            host = sharding.to_host(per_row)[:n]
            rows.append(np.asarray(host, np.float64))
            total += float(host.sum())
    kl = np.concatenate(rows) if rows else np.zeros((0,))
    stderr = float(kl.std(ddof=1) / np.sqrt(len(kl))) if len(kl) > 1 else 0.0
    return total / max(len(prompts), 1), stderr


@functools.partial(jax.jit, static_argnames=("cfg", "ref_cfg"))
def _sequence_kl(params, ref_params, prompt, prompt_mask, response, response_mask, cfg, ref_cfg):
    tokens = jax.numpy.concatenate([prompt, response], axis=1)
    mask = jax.numpy.concatenate([prompt_mask, response_mask], axis=1)
    p = prompt.shape[1]
    logp, _ = scoring.response_logprobs(Transformer(cfg), params, tokens, mask, p, 1.0)
    ref_logp, _ = scoring.response_logprobs(Transformer(ref_cfg), ref_params, tokens, mask, p, 1.0)
    return ((logp - ref_logp) * response_mask).sum(axis=1)


def measure_policy(
    stage: Stage,
    reference: Stage,
    rm: Any,
    prompts: Sequence[str],
    pretrain_file: str | pathlib.Path,
    kl_prompts: int = 200,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    gold: bool = True,
    cache_dir: str | pathlib.Path | None = None,
) -> dict[str, Any]:
    """One policy on ``prompts``, greedy: ``gold_eval``'s entries (``samples`` with each response's RM score
    as ``rm``), ``rm_score`` (the mean under ``rm``, a ``reward.RewardModel``), ``kl_to_reference`` (on the
    policy's own samples for the first ``kl_prompts``) and ``pretrain_nll`` on ``pretrain_file``."""
    result = gold_eval(stage, prompts, gold, max_new_tokens=max_new_tokens, batch_size=batch_size)
    samples = result["samples"]
    texts, stopped = [r["response"] for r in samples], [r["stopped"] for r in samples]
    scores = reward.score_texts(rm, prompts, texts, stopped, batch_size)
    for row, score in zip(samples, scores, strict=True):
        row["rm"] = float(score)
    result["rm_score"] = float(scores.mean())
    result["kl_to_reference"], result["kl_to_reference_se"] = kl_estimate(
        stage, reference, prompts[:kl_prompts], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    result["pretrain_nll"] = pretrain_nll(stage, pretrain_file, cache_dir=cache_dir)
    return result


def compare_models(
    workdirs: dict[str, str | pathlib.Path],
    *,
    baseline: str,
    rm: Any,
    prompts: Sequence[str],
    pretrain_file: str | pathlib.Path,
    kl_prompts: int = 200,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    gold: bool = True,
    best: Sequence[str] = (),
    cache_dir: str | pathlib.Path | None = None,
) -> dict[str, dict[str, Any]]:
    """The paper's comparison of policies (any stage workdirs, imported ones included), each against
    ``baseline`` (one of ``workdirs``' names), on ``prompts`` with greedy decoding:

    ``gold_score``, ``stop_rate``, ``response_words`` (``gold_eval``), ``rm_score`` (``rm``, a
    ``reward.RewardModel``), ``gold_win_rate_vs_<baseline>`` and ``rm_win_rate_vs_<baseline>`` (prompt by
    prompt, ties half), ``kl_to_<baseline>`` (on each model's own samples, first ``kl_prompts`` prompts),
    ``pretrain_nll`` on ``pretrain_file``, and ``samples`` (per prompt: response, stop, gold, RM score).
    ``gold=False`` for prompts outside the synthetic world: everything but the gold-score entries.
    The models named in ``best`` are evaluated at their selected checkpoint (``workdir/best``), the others
    at their latest. ``cache_dir``: where the held-out text's TFDS cache goes (``pretrain_nll``).
    """
    if baseline not in workdirs:
        raise ValueError(f"baseline {baseline!r} is not one of the models {sorted(workdirs)}")
    reference = load_stage(workdirs[baseline], best=baseline in best)
    models: dict[str, dict[str, Any]] = {}
    progress = tqdm(workdirs.items(), desc="evaluation", unit="model", disable=jax.process_index() != 0)
    for name, workdir in progress:
        progress.set_postfix_str(name)
        stage = reference if name == baseline else load_stage(workdir, best=name in best)
        result = measure_policy(
            stage, reference, rm, prompts, pretrain_file, kl_prompts, max_new_tokens, batch_size, gold, cache_dir
        )
        result[f"kl_to_{baseline}"] = result.pop("kl_to_reference")
        result[f"kl_to_{baseline}_se"] = result.pop("kl_to_reference_se")
        models[name] = result
    base_samples = models[baseline]["samples"]
    for result in models.values():
        for key in ("gold", "rm") if gold else ("rm",):
            mine, theirs = [r[key] for r in result["samples"]], [r[key] for r in base_samples]
            result[f"{key}_win_rate_vs_{baseline}"] = win_rate(mine, theirs)
    return models

"""The reward model as a scorer: the scalar head read at the EOS token, minus the normalisation bias.

The reward of a sequence is read at its last real token, the EOS of every well-formed sequence
(``scoring.last_token``, where the choice the paper leaves open is explained). A response with no EOS (cut
at the length limit) is read at its last token; PPO replaces that score by the missing-EOS penalty.

Bias normalisation (Ouyang et al. 2022, §3.5): after training, ``train_rm`` stores the mean raw reward of
the SFT demonstrations in ``<rm workdir>/reward_bias.json``; every public scorer here subtracts it, so the
demonstrations score 0 on average.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from instructjax import scoring, sharding
from instructjax.data import formats
from instructjax.model import ModelConfig, Transformer
from instructjax.stage import Stage, load_stage, sample_texts

BIAS_FILE = "reward_bias.json"


@functools.partial(jax.jit, static_argnames="cfg")
def _rewards(params: Any, tokens_bt: jax.Array, mask_bt: jax.Array, cfg: ModelConfig) -> jax.Array:
    return scoring.sequence_rewards(Transformer(cfg), params, tokens_bt, mask_bt)


@dataclasses.dataclass
class RewardModel:
    """A trained RM: its stage (model, params, tokenizer, mesh) and the demonstration bias."""

    stage: Stage
    bias: float


def load_reward_model(
    workdir: str | pathlib.Path, best: bool = True, mesh_shape: Sequence[int] | None = None
) -> RewardModel:
    """The RM of a ``train_rm`` workdir (the best validation checkpoint unless ``best=False``) and its bias."""
    bias = load_bias(workdir)
    loaded = load_stage(workdir, best=best, mesh_shape=mesh_shape)
    if loaded.model_cfg.head != "scalar":
        raise ValueError(f"{workdir} holds a model with head={loaded.model_cfg.head!r}, not a reward model")
    return RewardModel(loaded, bias)


def load_bias(workdir: str | pathlib.Path) -> float:
    """The demonstration bias ``train_rm`` stored in ``<workdir>/reward_bias.json``."""
    bias_file = pathlib.Path(workdir) / BIAS_FILE
    if not bias_file.exists():
        raise FileNotFoundError(f"{bias_file} is missing: the RM stage has not finished (rerun train_rm to finish it)")
    return float(json.loads(bias_file.read_text())["bias"])


def raw_scores(
    stage: Stage,
    prompts: Sequence[str],
    responses: Sequence[str],
    stopped: Sequence[bool] | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Raw RM rewards of (prompt, response) texts, encoded as in RM training (template, EOS if ``stopped``,
    the prompt cut from the left to fit ``data.max_len``; an RM imported from Hugging Face, which was never
    trained here, has no ``data.max_len``: its positions, ``model.max_len``, bound the length instead)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    stopped = [True] * len(prompts) if stopped is None else list(stopped)
    tok, data = stage.tokenizer, stage.config.data
    template, max_len = data.get("prompt_template", "{prompt}"), data.get("max_len", stage.model_cfg.max_len)
    divisor = sharding.batch_divisor(stage.mesh, stage.rules)
    batch_size = divisor * -(-batch_size // divisor)
    out = []
    with sharding.use(stage.mesh, stage.rules):
        for start in range(0, len(prompts), batch_size):
            tokens = np.full((batch_size, max_len), tok.pad_id, np.int32)
            mask = np.zeros((batch_size, max_len), np.int32)
            for row, i in enumerate(range(start, min(start + batch_size, len(prompts)))):
                response = tok.encode(responses[i]) + ([tok.eos_id] if stopped[i] else [])
                p, r = formats.truncate(tok.encode(template.format(prompt=prompts[i])), response, max_len)
                tokens[row, : len(p) + len(r)], mask[row, : len(p) + len(r)] = p + r, 1
            batch = sharding.put_global((tokens, mask), stage.mesh, stage.rules)
            rewards = sharding.to_host(_rewards(stage.params, *batch, cfg=stage.model_cfg))
            out.append(rewards[: min(batch_size, len(prompts) - start)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def score_texts(
    rm: RewardModel,
    prompts: Sequence[str],
    responses: Sequence[str],
    stopped: Sequence[bool] | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Normalised RM rewards (raw minus the demonstration bias) of (prompt, response) texts."""
    return raw_scores(rm.stage, prompts, responses, stopped, batch_size) - rm.bias


def policy_score_fn(
    rm: RewardModel, policy: Stage, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 64
) -> Callable[[Any], float]:
    """``score(params)``: the mean normalised RM score of greedy responses of the policy (``policy``'s model,
    tokenizer and mesh; its params are replaced) on ``prompts``. The paper's SFT checkpoint selection (§3.5)."""

    def score(params: Any) -> float:
        responses = sample_texts(
            dataclasses.replace(policy, params=params), prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        texts, stopped = zip(*responses, strict=True)
        return float(np.mean(score_texts(rm, prompts, texts, stopped, batch_size)))

    return score


def best_of_n(
    rm: RewardModel,
    policy: Stage,
    prompts: Sequence[str],
    gold_score: Callable[[str, str, bool], float],
    ns: Sequence[int] = (1, 2, 4, 8, 16, 32),
    *,
    max_new_tokens: int = 16,
    draws: int = 8,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Best-of-n under the RM against n (Gao et al. 2022): how much of the policy's own spread the RM can use.

    ``max(ns)`` samples per prompt at temperature 1 (one ``sample_texts`` call: each prompt prefilled once for
    all its samples); for each n, ``draws`` random subsets of n samples per
    prompt, and of each subset the RM's favourite (``rm_pick_gold``) and the gold-best (``oracle_gold``,
    what a perfect RM would pick), averaged; ``rm_pick_score`` is the RM's (the proxy's) score of its pick.
    ``kl`` is best-of-n's analytic KL to the policy, log n - (n - 1)/n. An RM that cannot rank the policy's
    samples gives ``rm_pick_gold`` flat in n.
    """
    total = max(ns)
    samples = sample_texts(
        policy, prompts, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, samples_per_prompt=total
    )
    texts, stopped = zip(*samples, strict=True)
    repeated = [p for p in prompts for _ in range(total)]  # prompt i's samples are items i·total .. (i+1)·total - 1
    golds = np.asarray([gold_score(p, t, st) for p, t, st in zip(repeated, texts, stopped, strict=True)])
    golds = golds.reshape(len(prompts), total)
    scores = np.asarray(score_texts(rm, repeated, texts, stopped)).reshape(len(prompts), total)
    rng, rows, out = np.random.default_rng(seed), np.arange(len(prompts)), []
    for n in ns:
        picks, pick_scores, oracle = [], [], []
        for _ in range(draws):
            subset = np.stack([rng.choice(total, size=n, replace=False) for _ in rows])  # [prompts, n]
            chosen = subset[rows, np.argmax(scores[rows[:, None], subset], axis=1)]
            picks.append(golds[rows, chosen].mean())
            pick_scores.append(scores[rows, chosen].mean())
            oracle.append(golds[rows[:, None], subset].max(axis=1).mean())
        kl = float(np.log(n) - (n - 1) / n)
        out.append(
            {
                "n": n,
                "kl": kl,
                "rm_pick_gold": float(np.mean(picks)),
                "rm_pick_score": float(np.mean(pick_scores)),
                "oracle_gold": float(np.mean(oracle)),
            }
        )
    return out

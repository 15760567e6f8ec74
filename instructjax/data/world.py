"""The synthetic instruction world: the embedded default dataset (docs/data.md, section 3).

Real runs need GPT-3 and human labelers; here a program plays both. Everything is deterministic from a seed
(``random.Random`` streams seeded by ``f"{seed}:{name}"``, independent of ``PYTHONHASHSEED``).

Three modules: ``world_tasks`` (vocabulary, prompts, ``solve``, ``gold_score``), ``world_writers`` (the noisy
writer and the pretraining corpus) and this one: the simulated labelers and ``write_world``, which writes the
whole world (every data file, ``tokenizer.json`` and ``world.json``) to a directory.

**Simulated labelers** (``simulated_ranking``): Plackett-Luce on ``gold_score / temperature`` (sampled as
``argsort(score / T + Gumbel)``), so every pair follows Bradley-Terry ``P(i > j) = sigmoid((s_i - s_j) / T)``.
Identical texts are tied (formats.py requires it). ``LABELER_TEMPERATURE`` was tuned with
``tune_labeler_temperature()`` so that two independent labelers agree on ~73% of pairs of distinct
SFT-quality completions (paper: 72.6 +- 1.5%, §3.4); ``labeler_agreement()`` measures it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import random
import time
from collections.abc import Sequence

from instructjax.data import formats
from instructjax.data.world_tasks import (
    ANSWER_MARK,
    EOS,
    EOS_ID,
    FAMILIES,
    PAD,
    PAD_ID,
    STOP_FACTOR,
    UNK,
    UNK_ID,
    VOCAB,
    gold_score,
    sample_prompt,
    write_tokenizer,
)
from instructjax.data.world_writers import (
    COMPARISON_MIX,
    LABELER,
    SFT,
    Style,
    corpus_stats,
    pretraining_document,
    write_completion,
)

# tune_labeler_temperature() (seed 0, 3000 prompts) gives 0.185: ~73% pairwise agreement on SFT-quality
# completions; tests/test_world.py re-measures it on other seeds.
LABELER_TEMPERATURE = 0.185


# ----------------------------------------------------------------------------------------------------------
# Simulated labelers
# ----------------------------------------------------------------------------------------------------------
def simulated_ranking(
    prompt: str,
    completions: Sequence[str],
    rng: random.Random,
    temperature: float = LABELER_TEMPERATURE,
    stopped: Sequence[bool] | None = None,
) -> list[list[int]]:
    """A labeler's ranking, best first, as tie groups (the canonical form of ``formats``).

    Plackett-Luce on ``gold_score / temperature``: each distinct text gets one Gumbel draw; identical texts
    share it and form one tie group. ``temperature <= 0`` is a noise-free labeler. ``stopped`` defaults to
    all True (data-file completions always end with EOS).
    """
    stopped = [True] * len(completions) if stopped is None else list(stopped)
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, key in enumerate(zip(completions, stopped, strict=True)):
        groups.setdefault(key, []).append(i)
    keyed = []
    for (text, stop), members in groups.items():
        score = gold_score(prompt, text, stop)
        if temperature > 0:
            u = max(rng.random(), 1e-300)
            keyed.append((score / temperature - math.log(-math.log(u)), members))
        else:
            keyed.append((score, members))
    keyed.sort(key=lambda km: (-km[0], km[1][0]))
    return [members for _, members in keyed]


def labeler_agreement(
    seed: int = 1,
    n_prompts: int = 2000,
    temperature: float = LABELER_TEMPERATURE,
    style: Style = SFT,
    k_range: tuple[int, int] = (4, 9),
) -> float:
    """Fraction of pairs of distinct completions that two independent simulated labelers order the same way.

    Completions are drawn from ``style`` (default: SFT quality, the paper's setting for its 72.6%).
    """
    rng = random.Random(f"{seed}:agreement")
    agree = total = 0
    for _ in range(n_prompts):
        prompt = sample_prompt(rng)
        texts = [write_completion(prompt, rng, style)[0] for _ in range(rng.randint(*k_range))]
        distinct = list(dict.fromkeys(texts))
        if len(distinct) < 2:
            continue
        pos = []
        for _ in range(2):
            rank = simulated_ranking(prompt, distinct, rng, temperature)
            pos.append({i: r for r, group in enumerate(rank) for i in group})
        for i, j in itertools.combinations(range(len(distinct)), 2):
            total += 1
            agree += (pos[0][i] < pos[0][j]) == (pos[1][i] < pos[1][j])
    return agree / total


def tune_labeler_temperature(target: float = 0.726, seed: int = 0, n_prompts: int = 3000, iters: int = 16) -> float:
    """Bisect (in log space) the temperature at which ``labeler_agreement`` hits ``target``."""
    lo, hi = math.log(1e-3), math.log(10.0)  # agreement falls as temperature rises
    for _ in range(iters):
        mid = (lo + hi) / 2
        if labeler_agreement(seed, n_prompts, math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


# ----------------------------------------------------------------------------------------------------------
# The whole world on disk
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorldSizes:
    """Rows per file. The defaults suit a CPU-scale pipeline (a ~1M-param model, minutes per stage)."""

    pretrain_train: int = 20_000
    pretrain_heldout: int = 1_000
    demos_train: int = 4_000
    demos_valid: int = 500
    comparisons_train: int = 2_000
    comparisons_valid: int = 250
    prompts_train: int = 1_000
    prompts_valid: int = 1_000
    prompts_test: int = 1_000
    k_min: int = 4  # completions per comparison prompt, uniform in [k_min, k_max] (paper: K = 4..9)
    k_max: int = 9

    def __post_init__(self):
        if not formats.MIN_K <= self.k_min <= self.k_max <= formats.MAX_K:
            raise ValueError(
                f"need {formats.MIN_K} <= k_min <= k_max <= {formats.MAX_K}, got {self.k_min}, {self.k_max}"
            )
        if any(getattr(self, f.name) < 1 for f in dataclasses.fields(self)):
            raise ValueError(f"every file needs at least one row (formats.read_jsonl rejects empty files): {self}")


# Prompt splits, carved in this order from one stream of unique prompts: all are disjoint.
_PROMPT_SPLITS = (
    "prompts_test",
    "prompts_valid",
    "demos_valid",
    "comparisons_valid",
    "demos_train",
    "comparisons_train",
    "prompts_train",
)
_HELD_OUT = ("prompts_test", "prompts_valid", "demos_valid", "comparisons_valid")


def _unique_prompts(rng: random.Random, n: int) -> list[str]:
    seen: dict[str, None] = {}
    for _ in range(50 * n + 1000):
        if len(seen) == n:
            return list(seen)
        seen.setdefault(sample_prompt(rng))
    raise RuntimeError(f"could not draw {n} unique prompts")


def _comparison_row(prompt: str, rng: random.Random, sizes: WorldSizes, temperature: float) -> dict:
    styles, weights = zip(*COMPARISON_MIX, strict=True)
    k = rng.randint(sizes.k_min, sizes.k_max)
    while True:  # at least two distinct texts, or every pair would be a tie
        texts = [write_completion(prompt, rng, rng.choices(styles, weights)[0])[0] for _ in range(k)]
        if len(set(texts)) >= 2:
            break
    ranking = simulated_ranking(prompt, texts, rng, temperature)
    return {"prompt": prompt, "completions": texts, "ranking": [g[0] if len(g) == 1 else g for g in ranking]}


def _comparison_agreement(rows: Sequence[dict], rng: random.Random, temperature: float) -> float:
    """Agreement of a second, independent labeler with the rankings written in ``rows`` (distinct-text pairs)."""
    agree = total = 0
    for row in rows:
        texts = row["completions"]
        first = {i: r for r, g in enumerate(formats.normalize_ranking(row["ranking"], len(texts))) for i in g}
        second = {i: r for r, g in enumerate(simulated_ranking(row["prompt"], texts, rng, temperature)) for i in g}
        for i, j in itertools.combinations(range(len(texts)), 2):
            if texts[i] != texts[j]:
                total += 1
                agree += (first[i] < first[j]) == (second[i] < second[j])
    return agree / max(total, 1)


def write_world(
    out_dir: str | pathlib.Path,
    seed: int = 0,
    sizes: WorldSizes = WorldSizes(),
    temperature: float = LABELER_TEMPERATURE,
) -> dict:
    """Write the whole world to ``out_dir`` (jsonl, ``tokenizer.json``, ``world.json``); returns world.json + seconds.

    Files: ``pretrain_train/heldout`` (``{"text"}``), ``demos_train/valid`` (``{"prompt", "completion"}``),
    ``comparisons_train/valid`` (``{"prompt", "completions", "ranking"}``, K = k_min..k_max), and
    ``prompts_train/valid/test`` (``{"prompt"}``). All prompt sets are disjoint; held-out prompts (valid/test)
    never occur in the pretraining corpus.
    """
    start = time.perf_counter()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def stream(name: str) -> random.Random:
        return random.Random(f"{seed}:{name}")

    pool = _unique_prompts(stream("prompts"), sum(getattr(sizes, s) for s in _PROMPT_SPLITS))
    splits, at = {}, 0
    for name in _PROMPT_SPLITS:
        splits[name], at = pool[at : at + getattr(sizes, name)], at + getattr(sizes, name)
    held_out = frozenset(itertools.chain.from_iterable(splits[s] for s in _HELD_OUT))

    rows: dict[str, list[dict]] = {}
    for name in ("pretrain_train", "pretrain_heldout"):
        rng = stream(name)
        rows[name] = [{"text": pretraining_document(rng, held_out)} for _ in range(getattr(sizes, name))]
    for name in ("demos_train", "demos_valid"):
        rng = stream(name)
        rows[name] = [{"prompt": p, "completion": write_completion(p, rng, LABELER)[0]} for p in splits[name]]
    for name in ("comparisons_train", "comparisons_valid"):
        rng = stream(name)
        rows[name] = [_comparison_row(p, rng, sizes, temperature) for p in splits[name]]
    for name in ("prompts_train", "prompts_valid", "prompts_test"):
        rows[name] = [{"prompt": p} for p in splits[name]]

    for name, file_rows in rows.items():
        formats.write_jsonl(out / f"{name}.jsonl", file_rows)
    write_tokenizer(out / "tokenizer.json")

    info = {
        "seed": seed,
        "sizes": dataclasses.asdict(sizes),
        "files": {f"{name}.jsonl": len(r) for name, r in rows.items()},
        "tokenizer": "tokenizer.json",
        "vocab_size": len(VOCAB),
        "special_ids": {PAD: PAD_ID, EOS: EOS_ID, UNK: UNK_ID},
        "answer_mark": ANSWER_MARK,
        "prompt_template": "<family> <args> =>",
        "families": list(FAMILIES),
        "gold_score": f"(1 - weighted_edit_distance / max(len)) * (1 if stopped else {STOP_FACTOR})",
        "labeler_temperature": temperature,
        "labeler_agreement_sft": labeler_agreement(seed, 1000, temperature),
        "labeler_agreement_comparisons_train": _comparison_agreement(
            rows["comparisons_train"], stream("second_labeler"), temperature
        ),
        "labeler_agreement_comparisons_valid": _comparison_agreement(
            rows["comparisons_valid"], stream("second_labeler_valid"), temperature
        ),
        "pretrain_after_mark": corpus_stats([r["text"] for r in rows["pretrain_train"]]),
        "mean_gold_demos_train": sum(gold_score(r["prompt"], r["completion"], True) for r in rows["demos_train"])
        / max(len(rows["demos_train"]), 1),
    }
    (out / "world.json").write_text(json.dumps(info, indent=1) + "\n")
    return info | {"seconds": round(time.perf_counter() - start, 2)}  # not in world.json: its bytes are seeded

"""The synthetic instruction world: the embedded default dataset (DESIGN.md "The embedded default").

Real runs need GPT-3 and human labelers; here a program plays both. Everything is deterministic from a seed
(``random.Random`` streams seeded by ``f"{seed}:{name}"``, independent of ``PYTHONHASHSEED``).

**Vocabulary.** Space-separated words, shipped as a HF ``tokenizers`` WordLevel ``tokenizer.json``
(``write_tokenizer``) and loaded with ``instructjax.tokenizer.load_tokenizer``. ``<pad>`` = 0, ``<eos>`` = 1,
``<unk>`` = 2, then ``=>`` = 3 (the answer mark), the family verbs, the numbers ``0``..``99``, item words and
filler words: ``len(VOCAB)`` < 256, so a tiny model with vocab_size 256 or 512 fits.

**Prompts** are ``"<family> <args> =>"``, e.g. ``"sort 14 3 9 =>"``, ``"count dog in cat dog dog =>"``,
``"add 12 7 =>"`` (<= 12 tokens); **answers** are the words after the mark, e.g. ``"3 9 14"`` (<= 8 tokens).
Data files hold the completion text without EOS: the SFT/RM pipelines append ``<eos>`` to every completion.
Families (``FAMILIES``), roughly easiest first: copy, first, last, length, reverse, max, min, add, subtract, count,
dedupe, sort.

**Gold score** r*(x, y) in [0, 1] (``gold_score``), the stand-in for the paper's human evaluation:
``correctness * (1 if stopped else STOP_FACTOR)`` with ``correctness = 1 - d(y, a) / max(|y|, |a|)``, where
``d`` is the word-level edit distance to the answer ``a`` (insert/delete cost 1, substitution cost 1, except
number-for-number, which costs ``min(1, |u - v| / 4)``: being close earns partial credit). Trailing junk
counts as inserted words; a response that never emits EOS keeps only ``STOP_FACTOR`` = 0.5 of its credit.
Worked examples for ``"sort 5 2 9 =>"`` (answer ``2 5 9``)::

    "2 5 9", stopped                     -> 1.0
    "2 5 9", not stopped                 -> 0.5
    "2 5 8", stopped                     -> 1 - 0.25/3 = 0.917
    "2 9 5", stopped                     -> 1 - 2/3    = 0.333   (two full substitutions)
    "2 5 9 . sort 1 3 =>", stopped       -> 1 - 5/8    = 0.375   (five junk words)
    "reverse cat dog =>", stopped        -> 1 - 4/4    = 0.0
    "add 12 7 =>": "19" -> 1.0, "18" -> 0.75, "21" -> 0.5, "15" -> 0.0

**Noisy writer** (``write_completion``, ``Style``): answers a prompt correctly, with 1..k corruptions
(substitution, adjacent swap, deletion, insertion), rambling on with ``.`` and another instruction, skipping
the answer for another instruction (what the web does), or not stopping. Presets: ``LABELER`` (labeler
demonstrations, 95% correct), ``SFT`` (what an SFT model writes), ``BASE`` (what the pretraining corpus and
a base model write).

**Pretraining corpus** (``pretraining_document``): like the web is to GPT-3, it mostly does *not* answer:
worksheets (instructions followed by more instructions), answer keys with errors, filler prose, and mixtures.
After ``=>`` the next word is usually another instruction (``corpus_stats`` measures it), so a base model
pretrained on it tends to continue a prompt with another instruction and rarely stops right after an answer.

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

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
ANSWER_MARK = "=>"
NUMBERS = tuple(str(i) for i in range(100))


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Roughly easiest first (one lookup ... a full sort); sampled uniformly.
FAMILIES = _words("copy first last length reverse max min add subtract count dedupe sort")
ITEMS = _words(
    "cat dog bird fish cow pig fox owl bee ant frog duck apple pear plum lime corn bean rice egg cup box hat key"
)
_DETS = _words("the a my your this")
_ADJS = _words("red blue green black white big small old new happy sad good bad hot cold")
_VERBS = _words("sees likes eats finds has wants makes takes")
_PRONS = _words("i you we they she he")
_PVERBS = _words("have see want like")
_FILLER = _words("is very in and then think .")
VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        (PAD, EOS, UNK, ANSWER_MARK) + FAMILIES + NUMBERS + ITEMS + _DETS + _ADJS + _VERBS + _PRONS + _PVERBS + _FILLER
    )
)
assert VOCAB[:3] == (PAD, EOS, UNK) and len(VOCAB) <= 400

STOP_FACTOR = 0.5
# tune_labeler_temperature() (seed 0, 3000 prompts) gives 0.185: ~73% pairwise agreement on SFT-quality
# completions; tests/test_world.py re-measures it on other seeds.
LABELER_TEMPERATURE = 0.185


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------
def write_tokenizer(path: str | pathlib.Path) -> pathlib.Path:
    """Write the world vocabulary as a HF ``tokenizers`` WordLevel ``tokenizer.json`` (whitespace split)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([PAD, EOS, UNK])
    path = pathlib.Path(path)
    tok.save(str(path))
    return path


# ----------------------------------------------------------------------------------------------------------
# Prompts and answers
# ----------------------------------------------------------------------------------------------------------
def _items(rng: random.Random, n: int, numbers: bool, pool_size: int | None = None) -> list[str]:
    """``n`` list items, all numbers (0..49) or all item words; a small ``pool_size`` forces repeats."""
    pool = NUMBERS[:50] if numbers else ITEMS
    if pool_size:
        pool = rng.sample(pool, pool_size)
    return [rng.choice(pool) for _ in range(n)]


def sample_prompt(rng: random.Random, families: Sequence[str] = FAMILIES) -> str:
    """One prompt ``"<family> <args> =>"`` of a uniformly chosen family."""
    family = rng.choice(families)
    numbers = rng.random() < 0.5
    if family in ("copy", "reverse", "first", "last"):
        args = _items(rng, rng.randint(2, 6), numbers)
    elif family == "length":
        args = _items(rng, rng.randint(1, 8), numbers)
    elif family == "dedupe":
        n = rng.randint(3, 7)
        args = _items(rng, n, numbers, pool_size=max(2, n - 2))
    elif family == "count":
        pool = rng.sample(ITEMS, 4)
        args = [rng.choice(pool), "in"] + [rng.choice(pool) for _ in range(rng.randint(3, 7))]
    elif family == "sort":
        args = [str(rng.randrange(50)) for _ in range(rng.randint(2, 6))]
    elif family in ("max", "min"):
        args = [str(rng.randrange(100)) for _ in range(rng.randint(2, 6))]
    elif family == "add":
        args = [str(rng.randrange(50)), str(rng.randrange(50))]
    else:  # subtract: non-negative results only
        a = rng.randrange(100)
        args = [str(a), str(rng.randint(0, a))]
    return " ".join([family, *args, ANSWER_MARK])


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """``(family, argument words)`` of a world prompt; ``ValueError`` if it is not one."""
    words = prompt.split()
    if len(words) < 3 or words[0] not in FAMILIES or words[-1] != ANSWER_MARK:
        raise ValueError(f"not a world prompt: {prompt!r}")
    family, args = words[0], words[1:-1]
    numeric = all(w.isdigit() for w in args)
    if (family in ("sort", "max", "min", "add", "subtract") and not numeric) or (
        family in ("add", "subtract") and len(args) != 2
    ):
        raise ValueError(f"not a world prompt: {prompt!r}")
    if family == "count" and (len(args) < 3 or args[1] != "in"):
        raise ValueError(f"not a world prompt: {prompt!r}")
    return family, args


def solve(prompt: str) -> list[str]:
    """The correct answer words of a world prompt."""
    family, args = parse_prompt(prompt)
    if family == "copy":
        return list(args)
    if family == "reverse":
        return args[::-1]
    if family == "first":
        return args[:1]
    if family == "last":
        return args[-1:]
    if family == "length":
        return [str(len(args))]
    if family == "dedupe":
        return list(dict.fromkeys(args))
    if family == "count":
        return [str(args[2:].count(args[0]))]
    values = [int(w) for w in args]
    if family == "sort":
        return [str(v) for v in sorted(values)]
    if family == "max":
        return [str(max(values))]
    if family == "min":
        return [str(min(values))]
    if family == "add":
        return [str(values[0] + values[1])]
    return [str(values[0] - values[1])]


# ----------------------------------------------------------------------------------------------------------
# Gold score
# ----------------------------------------------------------------------------------------------------------
def _sub_cost(u: str, v: str) -> float:
    if u == v:
        return 0.0
    if u.isdigit() and v.isdigit():
        return min(1.0, abs(int(u) - int(v)) / 4)
    return 1.0


def _edit_distance(a: Sequence[str], b: Sequence[str]) -> float:
    prev = [float(j) for j in range(len(b) + 1)]
    for i, u in enumerate(a, start=1):
        cur = [float(i)]
        for j, v in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + _sub_cost(u, v)))
        prev = cur
    return prev[-1]


def gold_score(prompt: str, response: str, stopped: bool) -> float:
    """r*(x, y) in [0, 1]: graded correctness times a clean-stop factor (module docstring has examples).

    ``response`` is the text *before* the first EOS and ``stopped`` says whether an EOS was emitted; for
    sampled ids use ``Tokenizer.decode_response(ids)``, which returns exactly ``(response, stopped)``. A
    response containing ``<eos>``/``<pad>`` is rejected, so a caller that forgot to cut at EOS fails loudly.
    """
    words = response.split()
    if EOS in words or PAD in words:
        raise ValueError(f"response must be the text before EOS, without special tokens: {response!r}")
    answer = solve(prompt)
    correctness = 1.0 - _edit_distance(words, answer) / max(len(words), len(answer))
    return correctness * (1.0 if stopped else STOP_FACTOR)


# ----------------------------------------------------------------------------------------------------------
# Noisy writer
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Style:
    """How a simulated writer answers. Probabilities are per completion."""

    p_answer: float = 1.0  # attempts the answer; otherwise goes straight on with another instruction
    p_correct: float = 1.0  # the attempt is exact; otherwise it carries 1..max_errors corruptions
    max_errors: int = 1
    p_ramble: float = 0.0  # after the answer, goes on with "." and another (maybe answered) instruction
    p_period: float = 0.0  # otherwise ends the answer with a closing "." (a writing habit; gold counts it as junk)
    p_short: float = 0.0  # stops early: keeps a strict prefix of the answer, possibly nothing
    p_nostop: float = 0.0  # never emits EOS (only for simulated model outputs: data files always stop)


# The labelers who write demonstrations end most answers with a period; the same labelers, ranking, prefer
# the bare answer (the gold score counts the "." as an extra word). Writing and judging differ, as in the
# paper: demonstrations are imperfect, comparisons carry what imitation misses (docs/data.md, "Noisy writer").
LABELER = Style(p_correct=0.95, max_errors=1, p_period=0.6)
SFT = Style(p_answer=0.97, p_correct=0.5, max_errors=2, p_ramble=0.1, p_period=0.6, p_short=0.1)
BASE = Style(p_answer=0.35, p_correct=0.5, max_errors=3, p_ramble=0.8)
# Comparison data: K completions from a mix of "models", as the paper's came from several policies.
COMPARISON_MIX: tuple[tuple[Style, float], ...] = ((LABELER, 0.25), (SFT, 0.5), (BASE, 0.25))


def _corrupt(words: list[str], rng: random.Random) -> list[str]:
    """One random error: substitution (numbers move by 1..3), adjacent swap, deletion or insertion."""
    for _ in range(10):  # an op can be a no-op (swap of equal words); retry
        out = list(words)
        op = rng.choice(("sub", "sub", "swap", "drop", "insert")) if len(out) > 1 else rng.choice(("sub", "insert"))
        i = rng.randrange(len(out))
        w = out[i]
        if op == "sub":
            if w.isdigit():
                out[i] = str(min(99, max(0, int(w) + rng.choice((-3, -2, -1, 1, 2, 3)))))
            else:
                out[i] = rng.choice(ITEMS)
        elif op == "swap":
            i = min(i, len(out) - 2)
            out[i], out[i + 1] = out[i + 1], out[i]
        elif op == "drop":
            del out[i]
        else:
            out.insert(rng.randrange(len(out) + 1), rng.choice(out))
        if out != words:
            return out
    return out


def _noisy_answer(prompt: str, rng: random.Random, style: Style) -> list[str]:
    answer = solve(prompt)
    if rng.random() >= style.p_correct:
        for _ in range(rng.randint(1, style.max_errors)):
            answer = _corrupt(answer, rng)
    return answer


def _ramble(rng: random.Random) -> list[str]:
    """Another instruction, half the time followed by a sloppy answer: what the web writes after a prompt."""
    prompt = sample_prompt(rng)
    words = prompt.split()
    if rng.random() < 0.5:
        words += _noisy_answer(prompt, rng, BASE)
    return words


def write_completion(prompt: str, rng: random.Random, style: Style = SFT) -> tuple[str, bool]:
    """A completion of ``prompt`` in ``style``: ``(text without EOS, stopped)``."""
    if rng.random() < style.p_answer:
        words = _noisy_answer(prompt, rng, style)
        if rng.random() < style.p_short:  # policies that learned to stop write these; the RM must see them
            return " ".join(words[: rng.randrange(len(words))]), rng.random() >= style.p_nostop
        if rng.random() < style.p_ramble:
            words += ["."] + _ramble(rng)
        elif rng.random() < style.p_period:
            words += ["."]
    else:
        words = _ramble(rng)
    return " ".join(words), rng.random() >= style.p_nostop


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
# Pretraining corpus
# ----------------------------------------------------------------------------------------------------------
def filler_sentence(rng: random.Random) -> list[str]:
    """One sentence of the filler prose that surrounds instructions on the "web"."""
    c = rng.choice
    templates = (
        lambda: [c(_DETS), c(_ADJS), c(ITEMS), c(_VERBS), c(_DETS), c(ITEMS)],
        lambda: [c(_PRONS), c(_PVERBS), str(rng.randint(2, 12)), c(ITEMS)],
        lambda: [c(_DETS), c(ITEMS), "is", *(["very"] if rng.random() < 0.3 else []), c(_ADJS)],
        lambda: [c(_PRONS), "think", c(_DETS), c(ITEMS), c(_VERBS), c(_DETS), c(_ADJS), c(ITEMS)],
        lambda: [c(_DETS), c(ITEMS), "is", "in", c(_DETS), c(ITEMS)],
        lambda: ["then", c(_DETS), c(ITEMS), c(_VERBS), c(_DETS), c(ITEMS), "and", c(_DETS), c(ITEMS)],
    )
    return c(templates)() + ["."]


_DOC_KINDS = (("worksheet", 0.4), ("answer_key", 0.25), ("prose", 0.2), ("mixed", 0.15))


def pretraining_document(rng: random.Random, exclude: frozenset[str] = frozenset()) -> str:
    """One "web" document of 24..96 words; prompts in ``exclude`` (held-out eval prompts) never appear."""

    def prompt() -> list[str]:
        while (p := sample_prompt(rng)) in exclude:
            pass
        return p.split()

    def worksheet_item() -> list[str]:
        return prompt()  # no answer: the next item follows right after "=>"

    def answered_item() -> list[str]:
        p = prompt()
        return p + _noisy_answer(" ".join(p), rng, BASE) + ["."]

    kind = rng.choices([k for k, _ in _DOC_KINDS], weights=[w for _, w in _DOC_KINDS])[0]
    segment = {
        "worksheet": worksheet_item,
        "answer_key": answered_item,
        "prose": lambda: filler_sentence(rng),
        "mixed": lambda: rng.choices((worksheet_item, answered_item, lambda: filler_sentence(rng)), (4, 2, 4))[0](),
    }[kind]
    length, words = rng.randint(24, 96), []
    while len(words) < length:
        words += segment()
    return " ".join(words)


def corpus_stats(texts: Sequence[str]) -> dict[str, float]:
    """What follows ``=>`` in ``texts``: fractions of another instruction, the exact answer, or anything else.

    This is the checkable proxy for "a base model pretrained on this does not follow instructions".
    """
    counts = {"instruction": 0, "correct_answer": 0, "other": 0}
    for text in texts:
        words = text.split()
        start = None  # index of the last family word: prompts hold exactly one, answers and prose none
        for i, w in enumerate(words):
            if w in FAMILIES:
                start = i
            if w != ANSWER_MARK:
                continue
            nxt = words[i + 1] if i + 1 < len(words) else None
            if nxt in FAMILIES:
                counts["instruction"] += 1
                continue
            try:
                answer = solve(" ".join(words[start : i + 1])) if start is not None else None
            except ValueError:
                answer = None
            ok = answer is not None and words[i + 1 : i + 1 + len(answer)] == answer
            counts["correct_answer" if ok else "other"] += 1
    total = max(sum(counts.values()), 1)
    return {k: v / total for k, v in counts.items()} | {"marks": float(sum(counts.values()))}


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

"""The synthetic world's simulated writers: completions of a prompt as labelers and models write them, and the
"web" the base model is pretrained on. ``world.py`` writes their texts to the world's files.

**Noisy writer** (``write_completion``, ``Style``): answers a prompt correctly, with 1..k corruptions
(substitution, adjacent swap, deletion, insertion), rambling on with ``.`` and another instruction, skipping
the answer for another instruction (what the web does), or not stopping. Presets: ``LABELER`` (labeler
demonstrations, 95% correct), ``SFT`` (what an SFT model writes), ``BASE`` (what the pretraining corpus and
a base model write).

**Pretraining corpus** (``pretraining_document``): like the web is to GPT-3, it mostly does *not* answer:
worksheets (instructions followed by more instructions), answer keys with errors, filler prose, and mixtures.
After ``=>`` the next word is usually another instruction (``corpus_stats`` measures it), so a base model
pretrained on it tends to continue a prompt with another instruction and rarely stops right after an answer.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from instructjax.data.world_tasks import (
    ADJS,
    ANSWER_MARK,
    DETS,
    FAMILIES,
    ITEMS,
    PRONS,
    PVERBS,
    VERBS,
    sample_prompt,
    solve,
)


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
# Pretraining corpus
# ----------------------------------------------------------------------------------------------------------
def filler_sentence(rng: random.Random) -> list[str]:
    """One sentence of the filler prose that surrounds instructions on the "web"."""
    c = rng.choice
    templates = (
        lambda: [c(DETS), c(ADJS), c(ITEMS), c(VERBS), c(DETS), c(ITEMS)],
        lambda: [c(PRONS), c(PVERBS), str(rng.randint(2, 12)), c(ITEMS)],
        lambda: [c(DETS), c(ITEMS), "is", *(["very"] if rng.random() < 0.3 else []), c(ADJS)],
        lambda: [c(PRONS), "think", c(DETS), c(ITEMS), c(VERBS), c(DETS), c(ADJS), c(ITEMS)],
        lambda: [c(DETS), c(ITEMS), "is", "in", c(DETS), c(ITEMS)],
        lambda: ["then", c(DETS), c(ITEMS), c(VERBS), c(DETS), c(ITEMS), "and", c(DETS), c(ITEMS)],
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

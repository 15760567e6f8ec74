"""The synthetic world's tasks: its vocabulary, prompts, correct answers (``solve``) and gold score
(``gold_score``). ``world.py`` writes the world's files; ``world_writers.py`` writes its texts.

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
"""

from __future__ import annotations

import pathlib
import random
from collections.abc import Sequence

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
# The words of filler prose (``world_writers.filler_sentence``), in the vocabulary too.
DETS = _words("the a my your this")
ADJS = _words("red blue green black white big small old new happy sad good bad hot cold")
VERBS = _words("sees likes eats finds has wants makes takes")
PRONS = _words("i you we they she he")
PVERBS = _words("have see want like")
_FILLER = _words("is very in and then think .")
VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        (PAD, EOS, UNK, ANSWER_MARK) + FAMILIES + NUMBERS + ITEMS + DETS + ADJS + VERBS + PRONS + PVERBS + _FILLER
    )
)
assert VOCAB[:3] == (PAD, EOS, UNK) and len(VOCAB) <= 400

STOP_FACTOR = 0.5


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

"""PPO's reward as a function: the reward model, the synthetic world's gold score, any Python callable, or a
weighted sum of these (an RM minus a length penalty, an ensemble of RMs).

**The reward-function contract.** ``fn(prompts, responses, stopped) -> scores``: ``prompts`` are the B prompt
texts as the policy read them (its template applied), ``responses`` the B sampled texts cut at the first
EOS, ``stopped`` B bools (whether the response emitted EOS). It returns B finite numbers (a list, tuple or
1-D array). It runs on the host, once per PPO iteration on the rollout batch and once per evaluation on the
validation responses. A wrong length, a non-number or a NaN/inf is a ``RewardError`` naming the term and
the iteration.

**Terms.** ``'rm'`` is the frozen reward model, computed on the device inside PPO's jitted score step: its
score minus its bias, replaced by ``missing_eos_penalty`` for a response without EOS (Huang et al. 2024,
detail 23). ``'gold'`` is the synthetic world's gold score (it prices a missing EOS itself). Anything else
is a reward function: a callable, or in a config its import path ``'package.module:function'``.

**In a config** (``config.reward``), a weighted sum is written as text:
``'rm'`` (the paper), ``'gold'`` (the oracle ablation), ``'mypkg.rewards:brevity'``, or
``'rm - 0.05*instructjax.reward_fns:response_words'``. From Python, ``weighted((1.0, 'rm'), (-0.05, fn))``
or ``parse(fn)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[bool]], Any]
BUILTIN = ("rm", "gold")
_TERM = re.compile(
    r"\s*(?P<sign>[+-])?\s*(?:(?P<weight>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\*\s*)?"
    r"(?P<name>[A-Za-z_][\w.]*(?::[A-Za-z_][\w.]*)?)\s*"
)


class RewardError(ValueError):
    """A reward term that returned something other than B finite numbers, or a spec that does not parse."""


@dataclasses.dataclass(frozen=True)
class Term:
    """``weight`` × a reward: ``name`` is ``'rm'``, ``'gold'`` or the function's name; ``fn`` is None for ``'rm'``
    (computed on the device)."""

    weight: float
    name: str
    fn: RewardFn | None


@dataclasses.dataclass(frozen=True)
class Reward:
    """A weighted sum of ``terms``; ``rm_weight`` is the RM's share (0: the RM is not computed)."""

    terms: tuple[Term, ...]

    @property
    def rm_weight(self) -> float:
        return float(sum(t.weight for t in self.terms if t.name == "rm"))

    @property
    def host_terms(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.name != "rm")

    def __str__(self) -> str:
        parts = []
        for t in self.terms:
            scale = f"{abs(t.weight):g}*" if abs(t.weight) != 1 else ""
            parts.append(("- " if t.weight < 0 else "+ ") + scale + t.name)
        return " ".join(parts).removeprefix("+ ")


def resolve(path: str) -> RewardFn:
    """The callable at ``'package.module:function'``."""
    module_name, _, attr = path.partition(":")
    if not attr:
        raise RewardError(f"reward {path!r}: expected 'rm', 'gold' or an import path 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward {path!r}: cannot import {module_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {path!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {path!r}: {attr} is not callable")
    return obj


def _term(weight: float, what: str | RewardFn, gold: RewardFn | None) -> Term:
    if callable(what):
        return Term(float(weight), getattr(what, "__name__", repr(what)), what)
    if what == "rm":
        return Term(float(weight), "rm", None)
    if what == "gold":
        if gold is None:
            raise RewardError("reward 'gold' needs the synthetic world's gold score; this data has no world.json")
        return Term(float(weight), "gold", gold)
    return Term(float(weight), what, resolve(what))


def weighted(*terms: tuple[float, str | RewardFn], gold: RewardFn | None = None) -> Reward:
    """``weighted((1.0, 'rm'), (-0.05, response_words))``: the sum of each weight × its reward."""
    if not terms:
        raise RewardError("a reward needs at least one term")
    if not all(math.isfinite(w) for w, _ in terms):
        raise RewardError(f"reward weights must be finite numbers: {[w for w, _ in terms]}")
    return Reward(tuple(_term(w, what, gold) for w, what in terms))


def parse(spec: str | RewardFn | Reward, *, gold: RewardFn | None = None) -> Reward:
    """A ``Reward`` from a config string (``'rm - 0.05*pkg.mod:fn'``), a callable, or a ``Reward`` (as is).
    ``gold`` is the batch gold-score function, when the data has one."""
    if isinstance(spec, Reward):
        return spec
    if callable(spec):
        return weighted((1.0, spec), gold=gold)
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward {spec!r}: expected a non-empty string, a callable or a Reward")
    terms, pos = [], 0
    while pos < len(spec):
        m = _TERM.match(spec, pos)
        if m is None or m.end() == pos or (terms and m.group("sign") is None):
            raise RewardError(f"reward {spec!r}: cannot read it from character {pos} ({spec[pos:]!r})")
        weight = float(m.group("weight") or 1.0) * (-1.0 if m.group("sign") == "-" else 1.0)
        terms.append((weight, m.group("name")))
        pos = m.end()
    return weighted(*terms, gold=gold)


def _checked(term: Term, raw: Any, batch: int, where: str) -> np.ndarray:
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise RewardError(f"{where}: reward term {term.name!r} returned non-numbers ({str(raw)[:80]})") from None
    if values.shape != (batch,):
        raise RewardError(f"{where}: reward term {term.name!r} returned shape {values.shape}; expected ({batch},)")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise RewardError(f"{where}: reward term {term.name!r} returned {values[bad[0]]} for row {bad[0]}")
    return values


def host_scores(
    reward: Reward, prompts: Sequence[str], responses: Sequence[str], stopped: Sequence[bool], where: str
) -> np.ndarray | None:
    """Σ weight × fn(prompts, responses, stopped) over the host terms, float64 [B], checked; None when the
    reward is the RM alone. ``where`` names the call in errors (``'PPO iteration 3'``)."""
    terms = reward.host_terms
    if not terms:
        return None
    total = np.zeros(len(prompts), np.float64)
    for term in terms:
        try:
            raw = term.fn(list(prompts), list(responses), [bool(s) for s in stopped])
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"{where}: reward term {term.name!r} raised {type(e).__name__}: {e}") from e
        total = total + term.weight * _checked(term, raw, len(prompts), where)
    return total


def batch_of(score: Callable[[str, str, bool], float]) -> RewardFn:
    """A per-example scorer ``score(prompt, response, stopped) -> float`` as a reward function."""

    def fn(prompts: Sequence[str], responses: Sequence[str], stopped: Sequence[bool]) -> list[float]:
        return [score(p, r, s) for p, r, s in zip(prompts, responses, stopped, strict=True)]

    fn.__name__ = getattr(score, "__name__", "score")
    return fn


def response_words(prompts: Sequence[str], responses: Sequence[str], stopped: Sequence[bool]) -> list[float]:
    """The number of words of each response: with a negative weight, a length penalty."""
    return [float(len(r.split())) for r in responses]


def no_eos(prompts: Sequence[str], responses: Sequence[str], stopped: Sequence[bool]) -> list[float]:
    """1 for a response that never emitted EOS, else 0: with a negative weight, a penalty for rambling."""
    return [0.0 if s else 1.0 for s in stopped]

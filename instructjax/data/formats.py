"""The four jsonl formats, their validation, the ranking -> pairs rule, and the truncation rule.

One JSON object per line (docs/data.md, section 1):

=============  ==========================================================================================
kind           fields
=============  ==========================================================================================
pretrain       ``{"text": str}``
demos          ``{"prompt": str, "completion": str}``
comparisons    ``{"prompt": str, "completions": [str, ...], "ranking": [int | [int, ...], ...]}``, K = 2..9;
               or ``{"prompt": str, "chosen": str, "rejected": str}`` (read as K = 2)
prompts        ``{"prompt": str}``
=============  ==========================================================================================

``ranking`` lists completion indices best first; a nested list is a tie group (``[[0, 2], 1, 3]``) whose
internal pairs are dropped. Comparisons are normalised to ``{"prompt", "completions", "ranking"}`` with the
ranking as a list of tie groups, each a sorted list (``[[0, 2], [1], [3]]``).

Validation policy (each choice is ours; the paper leaves data hygiene open):
- Every malformed line raises ``DataError("path:line: field 'f': what is wrong")`` (1-based line numbers).
  With ``skip_bad=True`` the line is skipped instead, counted by reason in ``ReadReport.skipped``, the first
  few messages are kept in ``ReadReport.examples``, and one warning is logged: nothing is dropped silently.
- Blank (whitespace-only) lines are not errors: they are skipped and counted in ``ReadReport.blank``.
- A UTF-8 BOM at the start of the file is accepted (``ReadReport.bom``); a BOM on a later line is an error.
- Bytes that are not UTF-8, lines over ``MAX_LINE_BYTES`` (1 MiB), bad JSON and non-objects are errors.
- Unknown fields are errors (a typo such as ``"completon"`` must not pass as a missing optional field),
  except the free-form ``OPTIONAL_FIELDS`` (``id``, ``meta``), which are allowed and dropped.
- Whitespace-only or empty ``text``/``prompt``/``completion``/``chosen``/``rejected`` are errors. An empty
  completion *inside* a comparison is allowed: a model that stops at once is a legitimate, usually bad, sample.
- ``chosen == rejected``, and more generally identical completions that the ranking does not tie, are
  errors: such a pair carries no preference, or a contradictory one.
- A ranking must be a permutation of ``range(K)`` (no index missing, repeated or out of range), ties at most
  one level deep, no empty tie group, and at least one ordered pair left after ties are dropped.
- A file that yields no valid row is an error.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

KINDS = ("pretrain", "demos", "comparisons", "prompts")
MIN_K, MAX_K = 2, 9
MAX_LINE_BYTES = 1 << 20
OPTIONAL_FIELDS = frozenset({"id", "meta"})
_BOM = b"\xef\xbb\xbf"
_REQUIRED = {"pretrain": ("text",), "demos": ("prompt", "completion"), "prompts": ("prompt",)}

Ranking = list[list[int]]


class DataError(ValueError):
    """A malformed line: ``path:line: field 'f': message``. ``reason`` is the short code skips are counted by."""

    def __init__(self, message: str, *, path: str = "", line: int = 0, field: str | None = None, reason: str = ""):
        self.path, self.line, self.field, self.reason, self.detail = path, line, field, reason, message
        where = f"{path}:{line}: " if path else ""
        super().__init__(where + (f"field '{field}': " if field else "") + message)


@dataclasses.dataclass
class ReadReport:
    """What ``read_jsonl`` saw: lines read, rows kept, blank lines, skips by reason, and the first skip messages."""

    path: str
    kind: str
    lines: int = 0
    rows: int = 0
    blank: int = 0
    bom: bool = False
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        skips = ", ".join(f"{reason}={n}" for reason, n in sorted(self.skipped.items())) or "none"
        return (
            f"{self.path} ({self.kind}): {self.rows} rows of {self.lines} lines; blank={self.blank}; skipped: {skips}"
        )


def _fail(reason: str, message: str, field: str | None = None):
    raise DataError(message, field=field, reason=reason)


def _text(row: dict, field: str, *, allow_empty: bool = False) -> str:
    value = row[field]
    if not isinstance(value, str):
        _fail("wrong_type", f"expected a string, got {type(value).__name__}", field)
    if not allow_empty and not value.strip():
        _fail(f"empty_{field}", "is empty", field)
    return value


def _check_fields(row: dict, required: Iterable[str]) -> None:
    required = tuple(required)
    for field in required:
        if field not in row:
            _fail("missing_field", "is missing", field)
    for field in row:
        if field not in required and field not in OPTIONAL_FIELDS:
            allowed = sorted(required) + sorted(OPTIONAL_FIELDS)
            _fail("unknown_field", f"is not a field of this format (allowed: {allowed})", field)


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def normalize_ranking(ranking: Any, k: int) -> Ranking:
    """Validate ``ranking`` for K completions and return it as sorted tie groups, best first."""
    if not isinstance(ranking, list) or not ranking:
        _fail("wrong_type", "expected a non-empty list of indices / tie groups", "ranking")
    groups: Ranking = []
    for entry in ranking:
        if _is_index(entry):
            groups.append([entry])
        elif isinstance(entry, list):
            if not entry:
                _fail("bad_ranking", "empty tie group []", "ranking")
            if any(isinstance(x, list) for x in entry):
                _fail("bad_ranking", f"tie group {entry} is nested deeper than one level", "ranking")
            if not all(_is_index(x) for x in entry):
                _fail("wrong_type", f"tie group {entry} must hold integers", "ranking")
            groups.append(sorted(entry))
        else:
            _fail("wrong_type", f"entry {entry!r} is neither an integer nor a list of integers", "ranking")
    seen: set[int] = set()
    for i in itertools.chain.from_iterable(groups):
        if not 0 <= i < k:
            _fail("bad_ranking", f"index {i} out of range for K={k} completions", "ranking")
        if i in seen:
            _fail("bad_ranking", f"index {i} appears twice", "ranking")
        seen.add(i)
    if missing := sorted(set(range(k)) - seen):
        _fail("bad_ranking", f"indices {missing} missing: must be a permutation of range({k})", "ranking")
    if len(groups) < 2:
        _fail("all_tied", "all completions are tied: no ordered pair is left", "ranking")
    return groups


def ranking_pairs(ranking: Sequence[int | Sequence[int]]) -> list[tuple[int, int]]:
    """All ``(winner, loser)`` pairs of a ranking (best first; nested lists are ties): C(K,2) minus tied pairs.

    >>> ranking_pairs([[0, 2], 1, 3])
    [(0, 1), (2, 1), (0, 3), (2, 3), (1, 3)]
    """
    groups = [[g] if _is_index(g) else list(g) for g in ranking]
    return [
        (w, lose) for hi, lo in itertools.combinations(range(len(groups)), 2) for lose in groups[lo] for w in groups[hi]
    ]


def _comparison(row: dict) -> dict:
    if "chosen" in row or "rejected" in row:
        _check_fields(row, ("prompt", "chosen", "rejected"))
        prompt, chosen, rejected = _text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected")
        if chosen == rejected:
            _fail("identical_completions", "chosen and rejected are the same text", "rejected")
        return {"prompt": prompt, "completions": [chosen, rejected], "ranking": [[0], [1]]}
    _check_fields(row, ("prompt", "completions", "ranking"))
    prompt, completions = _text(row, "prompt"), row["completions"]
    if not isinstance(completions, list):
        _fail("wrong_type", f"expected a list of strings, got {type(completions).__name__}", "completions")
    if not MIN_K <= len(completions) <= MAX_K:
        _fail("bad_k", f"K={len(completions)} completions; need {MIN_K}..{MAX_K}", "completions")
    for j, c in enumerate(completions):
        if not isinstance(c, str):
            _fail("wrong_type", f"completion {j} is a {type(c).__name__}, not a string", "completions")
    groups = normalize_ranking(row["ranking"], len(completions))
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    first_seen: dict[str, int] = {}
    for j, c in enumerate(completions):
        i = first_seen.setdefault(c, j)
        if group_of[i] != group_of[j]:
            _fail("identical_completions", f"completions {i} and {j} are identical but not tied", "ranking")
    return {"prompt": prompt, "completions": list(completions), "ranking": groups}


def validate_row(row: Any, kind: str) -> dict:
    """Check one parsed JSON value against ``kind`` and return its canonical form; raises ``DataError``."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; one of {KINDS}")
    if not isinstance(row, dict):
        _fail("not_object", f"expected a JSON object, got {type(row).__name__}")
    if kind == "comparisons":
        return _comparison(row)
    _check_fields(row, _REQUIRED[kind])
    return {field: _text(row, field) for field in _REQUIRED[kind]}


def _parse_line(raw: bytes, lineno: int) -> Any:
    if len(raw) > MAX_LINE_BYTES:
        _fail("line_too_long", f"line is {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit")
    if raw.startswith(_BOM):
        _fail("bom", "byte order mark (U+FEFF) inside the file (only allowed at the very start)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail("not_utf8", f"not valid UTF-8 (byte {raw[e.start]:#04x} at byte offset {e.start})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        _fail("bad_json", f"invalid JSON: {e.msg} at column {e.colno}")


def read_jsonl(path: str | pathlib.Path, kind: str, skip_bad: bool = False) -> tuple[list[dict], ReadReport]:
    """Read and validate a jsonl file of ``kind`` (one of ``KINDS``); rows come back in canonical form.

    Raises ``DataError`` (naming file, line and field) on the first malformed line unless ``skip_bad``, in
    which case malformed lines are counted in the report and logged. Blank lines are skipped and counted.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; one of {KINDS}")
    report, rows = ReadReport(str(path), kind), []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            report.lines += 1
            if lineno == 1 and raw.startswith(_BOM):
                raw, report.bom = raw[len(_BOM) :], True
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                report.blank += 1
                continue
            try:
                rows.append(validate_row(_parse_line(raw, lineno), kind))
            except DataError as e:
                located = DataError(e.detail, path=str(path), line=lineno, field=e.field, reason=e.reason)
                if not skip_bad:
                    raise located from None
                report.skipped[e.reason] += 1
                if len(report.examples) < 5:
                    report.examples.append(str(located))
    report.rows = len(rows)
    if report.n_skipped:
        logging.getLogger(__name__).warning("skipped bad lines: %s; first: %s", report.summary(), report.examples[0])
    if not rows:
        raise DataError(f"no valid {kind} rows ({report.summary()})", path=str(path), line=report.lines, reason="empty")
    return rows, report


def write_jsonl(path: str | pathlib.Path, rows: Iterable[dict]) -> int:
    """Write ``rows`` one JSON object per line (UTF-8, no BOM); returns the number of rows written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


@dataclasses.dataclass
class TruncationStats:
    """Counts of what ``truncate`` cut, to be logged by the caller (nothing is dropped silently; docs/data.md)."""

    sequences: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    prompt_tokens_removed: int = 0
    response_tokens_removed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def truncate(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    max_len: int,
    stats: TruncationStats | None = None,
    min_prompt_tokens: int = 1,
) -> tuple[list[int], list[int]]:
    """Fit ``prompt + response`` into ``max_len`` tokens; ``response_ids`` already ends with EOS if it has one.

    Rule: the response (and its EOS) is kept whole and the prompt is cut from the **left**, keeping its end,
    which holds the instruction nearest the answer. The prompt keeps at least ``min_prompt_tokens`` tokens;
    if the response still does not fit, it is cut from the right, so its EOS is lost: a cut response must
    not teach the model to stop there. Every cut is counted in ``stats``. For a prompt alone (PPO, eval)
    pass ``response_ids=[]``.
    """
    if max_len < min_prompt_tokens + (1 if response_ids else 0):
        raise ValueError(f"max_len={max_len} cannot hold {min_prompt_tokens} prompt token(s) plus a response")
    prompt, response = list(prompt_ids), list(response_ids)
    if stats is not None:
        stats.sequences += 1
    excess = len(prompt) + len(response) - max_len
    if excess <= 0:
        return prompt, response
    cut_prompt = min(excess, max(len(prompt) - min_prompt_tokens, 0))
    cut_response = excess - cut_prompt
    if stats is not None:
        stats.prompts_cut += cut_prompt > 0
        stats.responses_cut += cut_response > 0
        stats.prompt_tokens_removed += cut_prompt
        stats.response_tokens_removed += cut_response
    return prompt[cut_prompt:], response[: len(response) - cut_response]

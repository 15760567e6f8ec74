"""Adapters from public preference datasets' schemas to one ``Example``: a prompt, completions, a ranking.

Each adapter takes one ``sources.Record`` and returns an ``Example`` (or raises ``DataError`` naming the
file, the record number and the field). ``scripts/prepare_data.py`` (``instructjax/data/prepare.py``) turns
examples into the pipeline's nine jsonl files. The mappings and the choices the datasets leave open are in
docs/data.md, section 4:

- ``hh``: Anthropic HH-RLHF. ``chosen``/``rejected`` are whole dialogues (``\\n\\nHuman: … \\n\\nAssistant: …``);
  the text up to and including the last ``\\n\\nAssistant:`` is the prompt and must be the same in both; what
  follows it is the completion.
- ``tldr``: OpenAI's summarize-from-feedback. A comparison record (``info`` with the post, ``summaries[i].text``,
  ``choice``) is a K = 2 ranking; a TL;DR SFT record (``post``, ``summary``, optional ``title``/``subreddit``) is
  a demonstration. The prompt is ``TLDR_TEMPLATE``.
- ``ultrafeedback``: an ``instruction`` and several ``completions`` each with ratings: one K-way ranking per
  prompt, best first, equal ratings tied (the InstructGPT RM's own setting, App. C.2 / Eq. 1). The rating is
  ``overall_score`` or the mean of the four aspect ratings (``rating="aspects"``).
- ``conversational``: ``prompt``/``chosen``/``rejected`` as lists of ``{"role", "content"}`` messages (TRL's
  conversational preference format); without ``prompt``, the shared messages before the last one.

An ``Example`` carries the prompt twice: as chat ``messages`` (rendered with the model's chat template when
it has one) and as ``text``, the dataset's own plain format. Completions continue ``text`` (so they begin
with a space, as in the datasets); with a chat template they are stripped.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from instructjax.data.formats import MAX_K, MIN_K
from instructjax.data.sources import Record

SOURCES = ("hh", "tldr", "ultrafeedback", "conversational")
RATINGS = ("overall", "aspects")
ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")  # UltraFeedback's four
# The TL;DR prompt of Stiennon et al. 2020 and Huang et al. 2024 ("The N+ implementation details"); a line
# whose field the record lacks (CNN/DM articles have no subreddit) is left out.
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_PLAIN_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}


@dataclasses.dataclass
class Example:
    """A prompt (as chat ``messages`` and as the dataset's plain ``text``), its completions (continuing
    ``text``) and their ``ranking`` (best first, tie groups); ``ranking`` is None for a demonstration."""

    messages: list[dict[str, str]]
    text: str
    completions: list[str]
    ranking: list[list[int]] | None


def plain_dialogue(messages: list[dict[str, str]]) -> str:
    """A conversation in HH-RLHF's plain format, ending where the assistant's reply begins."""
    turns = "".join(f"\n\n{_PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)
    return turns + "\n\nAssistant:"


def _field(record: Record, data: Any, name: str, kind: type | tuple = str, where: str = "") -> Any:
    field = f"{where}{name}"
    if not isinstance(data, dict):
        raise record.error("not_object", f"expected an object, got {type(data).__name__}", where.rstrip(".") or None)
    if name not in data or data[name] is None:
        raise record.error("missing_field", "missing", field)
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise record.error("wrong_type", f"expected {expected}, got {type(value).__name__}", field)
    return value


def ranking_from_scores(scores: list[float]) -> list[list[int]]:
    """Indices best first; equal scores form one tie group (``[3, 5, 5, 1]`` -> ``[[1, 2], [0], [3]]``)."""
    groups: dict[float, list[int]] = {}
    for i, s in enumerate(scores):
        groups.setdefault(s, []).append(i)
    return [groups[s] for s in sorted(groups, reverse=True)]


# ---------------------------------------------------------------------------------------------- HH-RLHF


def _hh_split(record: Record, field: str) -> tuple[str, list[dict[str, str]], str]:
    """A dialogue -> (the prompt text through the last '\\n\\nAssistant:', its messages, the completion)."""
    text = _field(record, record.data, field)
    marks = list(_HH_TURN.finditer(text))
    if not marks or text[: marks[0].start()].strip():
        raise record.error("no_human_turn", "does not begin with a '\\n\\nHuman:' turn", field)
    if marks[0].group(1) != "Human":
        raise record.error("no_human_turn", "the first turn is the Assistant's, not a Human's", field)
    last = max((i for i, m in enumerate(marks) if m.group(1) == "Assistant"), default=None)
    if last is None:
        raise record.error("no_assistant_turn", "no '\\n\\nAssistant:' turn", field)
    if last != len(marks) - 1:
        raise record.error("ends_with_human", "a Human turn follows the last Assistant turn", field)
    messages = []
    for m, nxt in zip(marks[:last], marks[1 : last + 1], strict=True):
        role = "user" if m.group(1) == "Human" else "assistant"
        messages.append({"role": role, "content": text[m.end() : nxt.start()].strip()})
    return text[: marks[last].end()], messages, text[marks[last].end() :]


def hh(record: Record) -> Example:
    """Anthropic HH-RLHF: ``{"chosen": dialogue, "rejected": dialogue}`` -> a K = 2 ranking."""
    prefix, messages, chosen = _hh_split(record, "chosen")
    other_prefix, _, rejected = _hh_split(record, "rejected")
    if other_prefix != prefix:
        raise record.error(
            "prefixes_differ", "its dialogue before the last Assistant turn differs from chosen's", "rejected"
        )
    return Example(messages, prefix, [chosen, rejected], [[0], [1]])


# ---------------------------------------------------------------------------------------------- TL;DR


def tldr_prompt(post: str, title: str | None = None, subreddit: str | None = None) -> str:
    """``TLDR_TEMPLATE`` filled in; the SUBREDDIT and TITLE lines are left out when the record lacks them."""
    lines = [f"SUBREDDIT: r/{subreddit}"] if subreddit else []
    lines += [f"TITLE: {title.strip()}"] if title else []
    return "\n\n".join([*lines, f"POST: {post.strip()}", "TL;DR:"])


def _tldr_text(record: Record, data: dict, where: str) -> str:
    key = "post" if isinstance(data, dict) and data.get("post") is not None else "article"  # CNN/DM: 'article'
    if not isinstance(data, dict) or data.get(key) is None:
        raise record.error("missing_field", "missing (neither 'post' nor 'article')", f"{where}post")
    post = _field(record, data, key, where=where)
    if not post.strip():
        raise record.error("empty_post", "empty", f"{where}{key}")
    title, subreddit = data.get("title"), data.get("subreddit")
    for name, value in (("title", title), ("subreddit", subreddit)):
        if value is not None and not isinstance(value, str):
            raise record.error("wrong_type", f"expected str, got {type(value).__name__}", f"{where}{name}")
    return tldr_prompt(post, title, subreddit)


def tldr(record: Record) -> Example:
    """summarize-from-feedback: a comparison record -> a K = 2 ranking; a post/summary record -> a demo.
    A summary gets one leading space, so it continues ``TL;DR:`` as the dataset's human summaries do."""
    data = record.data
    if isinstance(data, dict) and "summaries" not in data and "summary" in data:  # the TL;DR SFT split
        text = _tldr_text(record, data, "")
        summary = _field(record, data, "summary")
        if not summary.strip():
            raise record.error("empty_summary", "empty", "summary")
        return Example([{"role": "user", "content": text}], text, [" " + summary.strip()], None)
    text = _tldr_text(record, _field(record, data, "info", dict), "info.")
    summaries = _field(record, data, "summaries", list)
    if not MIN_K <= len(summaries) <= MAX_K:
        raise record.error("bad_k", f"{len(summaries)} summaries; need {MIN_K}..{MAX_K}", "summaries")
    texts = [" " + _field(record, s, "text", where=f"summaries[{i}].").strip() for i, s in enumerate(summaries)]
    choice = _field(record, data, "choice", int)
    if not 0 <= choice < len(summaries):
        raise record.error("bad_choice", f"{choice} is not a summary index (0..{len(summaries) - 1})", "choice")
    ranking = [[choice]] + [[i] for i in range(len(summaries)) if i != choice]
    return Example([{"role": "user", "content": text}], text, texts, ranking)


# ---------------------------------------------------------------------------------------------- UltraFeedback


def _rating(record: Record, completion: Any, i: int, rating: str) -> float:
    where = f"completions[{i}]."
    if rating == "overall":
        value = _field(record, completion, "overall_score", (int, float), where)
    else:  # the mean of the aspects that were rated ("N/A" marks an aspect that does not apply)
        annotations = _field(record, completion, "annotations", dict, where)
        values = []
        for aspect in ASPECTS:
            raw = annotations.get(aspect, {})
            raw = raw.get("Rating") if isinstance(raw, dict) else raw
            if raw in (None, "N/A"):
                continue
            try:
                values.append(float(raw))
            except (TypeError, ValueError):
                raise record.error(
                    "bad_rating", f"rating {raw!r} is not a number", f"{where}annotations.{aspect}"
                ) from None
        if not values:
            raise record.error("bad_rating", "no aspect has a numeric rating", f"{where}annotations")
        value = sum(values) / len(values)
    if not math.isfinite(value):
        raise record.error("bad_rating", f"rating {value} is not finite", f"{where}overall_score")
    return float(value)


def ultrafeedback(record: Record, rating: str = "overall") -> Example | None:
    """``{"instruction", "completions": [{"response", "overall_score", "annotations"}, ...]}`` -> one K-way
    ranking. None when every completion has the same rating: no preference, a counted skip (``all_tied``)."""
    if rating not in RATINGS:
        raise ValueError(f"rating={rating!r}: one of {RATINGS}")
    instruction = _field(record, record.data, "instruction")
    if not instruction.strip():
        raise record.error("empty_instruction", "empty", "instruction")
    completions = _field(record, record.data, "completions", list)
    if not MIN_K <= len(completions) <= MAX_K:
        raise record.error("bad_k", f"{len(completions)} completions; need {MIN_K}..{MAX_K}", "completions")
    responses = [_field(record, c, "response", where=f"completions[{i}].") for i, c in enumerate(completions)]
    scores = [_rating(record, c, i, rating) for i, c in enumerate(completions)]
    ranking = ranking_from_scores(scores)
    if len(ranking) == 1:
        return None
    messages = [{"role": "user", "content": instruction}]
    return Example(messages, plain_dialogue(messages), [" " + r.strip() for r in responses], ranking)


# ---------------------------------------------------------------------------------------------- conversational


def _messages(record: Record, value: Any, field: str, text_role: str) -> list[dict[str, str]]:
    if isinstance(value, str):  # TRL's "standard" format: plain text, one turn of ``text_role``
        return [{"role": text_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise record.error("wrong_type", "expected a non-empty list of {role, content} messages", field)
    out = []
    for i, m in enumerate(value):
        role = _field(record, m, "role", where=f"{field}[{i}].")
        content = _field(record, m, "content", where=f"{field}[{i}].")
        if not role.strip():
            raise record.error("bad_role", "empty role", f"{field}[{i}].role")
        out.append({"role": role, "content": content})
    return out


def conversational(record: Record) -> Example:
    """``{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}``. ``chosen``
    and ``rejected`` may also be whole conversations (the prompt's messages, then the reply); without
    ``prompt`` they must share every message before their last."""
    data = record.data
    given = isinstance(data, dict) and data.get("prompt") is not None
    chosen = _messages(record, _field(record, data, "chosen", (list, str)), "chosen", "assistant")
    rejected = _messages(record, _field(record, data, "rejected", (list, str)), "rejected", "assistant")
    prompt = _messages(record, data["prompt"], "prompt", "user") if given else chosen[:-1]
    if not prompt:
        raise record.error("missing_field", "no prompt field and no conversation before the last message", "prompt")
    if prompt[-1]["role"] == "assistant":
        raise record.error("bad_role", "the prompt ends with an assistant message", "prompt")
    replies = []
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if (len(conversation) > 1 or not given) and conversation[:-1] != prompt:
            raise record.error("prefixes_differ", "its messages before the reply differ from the prompt", name)
        reply = conversation[-1]
        if reply["role"] != "assistant":
            raise record.error("bad_role", f"the reply is a {reply['role']!r} message, not the assistant's", name)
        replies.append(" " + reply["content"].strip())
    return Example(prompt, plain_dialogue(prompt), replies, [[0], [1]])


def adapt(source: str, record: Record, *, rating: str = "overall") -> Example | None:
    """The adapter of ``source`` (one of ``SOURCES``) applied to ``record``."""
    if source == "hh":
        return hh(record)
    if source == "tldr":
        return tldr(record)
    if source == "ultrafeedback":
        return ultrafeedback(record, rating)
    if source == "conversational":
        return conversational(record)
    raise ValueError(f"source={source!r}: one of {SOURCES}")

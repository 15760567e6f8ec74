"""A public dataset -> the nine jsonl files the pipeline reads (``scripts/prepare_data.py``).

``prepare(source, input_path, out_dir, ...)`` reads the dataset (``sources.read_splits``), maps its splits
onto train / valid / test (``sources.assign_splits``), turns each record into an ``Example``
(``public.adapt``), renders its prompt (the model's chat template, or the dataset's plain format), checks
every row with ``formats.validate_row`` and writes:

==========================  =============================================================================
file                        rows
==========================  =============================================================================
comparisons_{train,valid}   every ranked example (K = 2..9, best first, ties kept)
demos_{train,valid}         each example's best completion (the first of the top tie group); for TL;DR
                            with ``sft_input``, the SFT split's human summaries instead
prompts_{train,valid,test}  the demos' prompts, each once (PPO's rollouts and the evaluation)
pretrain_{train,heldout}    ``pretrain`` (a jsonl of ``{"text"}``, heldout carved with the seed), else
                            each demo's prompt + completion: a stand-in for the pretraining mix
==========================  =============================================================================

A bad record raises ``DataError`` (file, record number, field); with ``skip_bad`` it is skipped and counted
by reason. An UltraFeedback prompt whose completions all have the same rating is always a counted skip
(``all_tied``). Exact duplicate rows are written once and counted. ``prepare_report.json`` records
everything: rows per file, skips by reason, duplicates, the template used, token-length percentiles and the
rows the configured maximum lengths would truncate.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import pathlib
import random
from collections.abc import Mapping
from typing import Any

import numpy as np

from instructjax import chat_template
from instructjax.data import formats, public, sources
from instructjax.tokenizer import load_tokenizer

REPORT_FILE = "prepare_report.json"


@dataclasses.dataclass
class Rendered:
    """The rows of one example: its prompt as the model reads it, completions, ranking (None: a demo)."""

    prompt: str
    completions: list[str]
    ranking: list[list[int]] | None


def render(example: public.Example, template: str | None, special_tokens: Mapping[str, str]) -> Rendered:
    """The prompt through the chat template (completions stripped), or the dataset's plain text."""
    if template is None:
        return Rendered(example.text, list(example.completions), example.ranking)
    prompt = chat_template.render(template, example.messages, add_generation_prompt=True, special_tokens=special_tokens)
    return Rendered(prompt, [c.strip() for c in example.completions], example.ranking)


def _examples(
    source: str,
    records: list[sources.Record],
    template: str | None,
    tokens: Mapping[str, str],
    *,
    rating: str,
    skip_bad: bool,
    skipped: collections.Counter,
    messages: list[str],
) -> list[Rendered]:
    out = []
    for record in records:
        try:
            example = public.adapt(source, record, rating=rating)
            if example is None:
                skipped["all_tied"] += 1
                continue
            try:
                rendered = render(example, template, tokens)
            except chat_template.ChatTemplateError as e:
                raise record.error("chat_template", str(e), "prompt") from None
            row = {"prompt": rendered.prompt}
            if rendered.ranking is None:
                formats.validate_row({**row, "completion": rendered.completions[0]}, "demos")
            else:
                row |= {"completions": rendered.completions, "ranking": rendered.ranking}
                formats.validate_row(row, "comparisons")
        except formats.DataError as e:
            if not e.path:  # raised by validate_row: give it the record's place
                e = record.error(e.reason, e.detail, e.field)
            if not skip_bad:
                raise e from None
            skipped[e.reason] += 1
            if len(messages) < 5:
                messages.append(str(e))
            continue
        out.append(rendered)
    return out


def _unique(rows: list[dict], duplicates: collections.Counter, name: str) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        key = json.dumps(row, sort_keys=True)
        if key in seen:
            duplicates[name] += 1
            continue
        seen.add(key)
        out.append(row)
    return out


def _percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    a = np.asarray(lengths)
    return {f"p{q}": int(np.percentile(a, q)) for q in (50, 90, 99)} | {"max": int(a.max())}


def token_lengths(files: Mapping[str, list[dict]], tokenizer: Any, max_len: int, max_prompt_len: int) -> dict:
    """Token-length percentiles of the train files' prompts and completions, and how many rows ``max_len``
    (prompt + completion + EOS; a comparison counts its longest completion) and ``max_prompt_len`` cut."""
    enc = tokenizer.encode
    demo_prompt = [len(enc(r["prompt"])) for r in files["demos_train"]]
    demo_completion = [len(enc(r["completion"])) for r in files["demos_train"]]
    comparison_total = [
        len(enc(r["prompt"])) + max(len(enc(c)) for c in r["completions"]) + 1 for r in files["comparisons_train"]
    ]
    prompts = [len(enc(r["prompt"])) for r in files["prompts_train"]]
    out = {
        "demos_train.prompt": _percentiles(demo_prompt),
        "demos_train.completion": _percentiles(demo_completion),
        "comparisons_train.longest": _percentiles(comparison_total),
        "prompts_train.prompt": _percentiles(prompts),
    }
    truncated = {}
    if max_len:
        truncated["demos_train"] = sum(p + c + 1 > max_len for p, c in zip(demo_prompt, demo_completion, strict=True))
        truncated["comparisons_train"] = sum(t > max_len for t in comparison_total)
    if max_prompt_len:
        truncated["prompts_train"] = sum(p > max_prompt_len for p in prompts)
    return {"lengths": out, "truncated": truncated, "max_len": max_len, "max_prompt_len": max_prompt_len}


def _pretrain_rows(
    pretrain: str | pathlib.Path | None, demos: Mapping[str, list[dict]], seed: int, heldout_fraction: float
) -> tuple[list[dict], list[dict]]:
    if pretrain is None:  # the dataset's own text stands in for the pretraining distribution
        return (
            [{"text": r["prompt"] + r["completion"]} for r in demos["train"]],
            [{"text": r["prompt"] + r["completion"]} for r in demos["test"]],
        )
    rows, _ = formats.read_jsonl(pretrain, "pretrain")
    order = list(range(len(rows)))
    random.Random(f"{seed}:pretrain").shuffle(order)
    n = max(1, round(len(rows) * heldout_fraction))
    if n >= len(rows):
        raise ValueError(f"{pretrain}: {len(rows)} rows are too few to hold out {n}")
    heldout = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in heldout], [r for i, r in enumerate(rows) if i in heldout]


def prepare(
    source: str,
    input_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    sft_input: str | pathlib.Path | None = None,
    pretrain: str | pathlib.Path | None = None,
    tokenizer: str | pathlib.Path | None = None,
    template: str = "auto",
    rating: str = "overall",
    splits: Mapping[str, str] | None = None,
    seed: int = 0,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    skip_bad: bool = False,
    max_len: int = 0,
    max_prompt_len: int = 0,
) -> dict:
    """Write the nine files for ``source`` (``public.SOURCES``) into ``out_dir``; returns the report.

    ``template``: ``'auto'`` (the tokenizer's chat template when it has one), ``'none'`` (the dataset's plain
    format), or a path to a jinja file. ``sft_input``: TL;DR's SFT split, the demonstrations and PPO prompts
    (Huang et al. 2024 train SFT and PPO on it); without it they come from the comparisons."""
    if source not in public.SOURCES:
        raise ValueError(f"source={source!r}: one of {public.SOURCES}")
    if sft_input is not None and source != "tldr":
        raise ValueError("sft_input is TL;DR's SFT split: only for source='tldr'")
    out_dir = pathlib.Path(out_dir)
    tok = load_tokenizer(tokenizer) if tokenizer else None
    text, tokens, origin = None, {}, "none: the dataset's plain format"
    if template not in ("auto", "none"):
        text, origin = pathlib.Path(template).read_text(), str(template)
        if tokenizer:
            tokens = chat_template.find_chat_template(tokenizer)[1]
    elif template == "auto" and tokenizer:
        text, tokens = chat_template.find_chat_template(tokenizer)
        origin = f"{tokenizer}'s chat template" if text else origin + f" ({tokenizer} has no chat template)"
    if text is None and source == "conversational":
        logging.warning("conversational data without a chat template: written in HH-RLHF's plain format")

    skipped: collections.Counter = collections.Counter()
    messages: list[str] = []
    records: dict[str, int] = {}

    def read(path, mapping) -> dict[str, list[Rendered]]:
        roles = sources.assign_splits(
            sources.read_splits(path),
            mapping=mapping,
            seed=seed,
            valid_fraction=valid_fraction,
            test_fraction=test_fraction,
        )
        for role, rs in roles.items():
            records[f"{pathlib.Path(path).name}:{role}"] = len(rs)
        kw = dict(rating=rating, skip_bad=skip_bad, skipped=skipped, messages=messages)
        return {role: _examples(source, rs, text, tokens, **kw) for role, rs in roles.items()}

    ranked = read(input_path, splits)
    demo_source = read(sft_input, None) if sft_input is not None else ranked
    duplicates: collections.Counter = collections.Counter()
    files: dict[str, list[dict]] = {}
    demos = {}
    for role, examples in demo_source.items():
        rows = [
            {"prompt": e.prompt, "completion": e.completions[e.ranking[0][0] if e.ranking else 0]} for e in examples
        ]
        demos[role] = _unique(rows, duplicates, f"demos_{role}")
        prompts = [{"prompt": r["prompt"]} for r in demos[role]]
        files[f"prompts_{role}"] = _unique(prompts, duplicates, f"prompts_{role}")
    for role in ("train", "valid"):
        files[f"demos_{role}"] = demos[role]
        comparisons = [
            {"prompt": e.prompt, "completions": e.completions, "ranking": e.ranking} for e in ranked[role] if e.ranking
        ]
        files[f"comparisons_{role}"] = _unique(comparisons, duplicates, f"comparisons_{role}")
    files["pretrain_train"], files["pretrain_heldout"] = _pretrain_rows(pretrain, demos, seed, valid_fraction)

    empty = sorted(name for name, rows in files.items() if not rows)
    if empty:
        raise ValueError(f"{input_path}: no rows for {', '.join(empty)} (skipped: {dict(skipped)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        formats.write_jsonl(out_dir / f"{name}.jsonl", rows)
    report = {
        "source": source,
        "input": str(input_path),
        "sft_input": None if sft_input is None else str(sft_input),
        "pretrain": None if pretrain is None else str(pretrain),
        "template": origin,
        "rating": rating if source == "ultrafeedback" else None,
        "records": records,
        "rows": {name: len(rows) for name, rows in files.items()},
        "skipped": dict(skipped),
        "skip_examples": messages,
        "duplicates": dict(duplicates),
        "tokens": token_lengths(files, tok, max_len, max_prompt_len) if tok is not None else None,
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report

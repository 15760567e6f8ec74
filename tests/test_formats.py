"""jsonl formats: good rows, every malformed case (error naming file:line and field, or a counted skip),
ranking pairs, and the truncation rule."""

import itertools
import json
import logging
import random

import pytest

from instructjax.data import formats

GOOD = {
    "pretrain": {"text": "the cat sees a dog ."},
    "demos": {"prompt": "sort 3 1 2 =>", "completion": "1 2 3"},
    "comparisons": {"prompt": "sort 3 1 =>", "completions": ["1 3", "3 1", "1"], "ranking": [0, 2, 1]},
    "prompts": {"prompt": "add 2 3 =>"},
}


def _write(tmp_path, lines, name="data.jsonl"):
    """Write raw lines (str is JSON-encoded if not already a str; bytes are written as is)."""
    path = tmp_path / name
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict | list):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


@pytest.mark.parametrize("kind", formats.KINDS)
def test_good_rows_of_each_kind(tmp_path, kind):
    path = _write(tmp_path, [GOOD[kind], GOOD[kind]])
    rows, report = formats.read_jsonl(path, kind)
    assert len(rows) == 2 and report.rows == 2 and report.lines == 2 and report.n_skipped == 0
    if kind == "comparisons":
        assert rows[0] == {"prompt": "sort 3 1 =>", "completions": ["1 3", "3 1", "1"], "ranking": [[0], [2], [1]]}
    else:
        assert rows[0] == GOOD[kind]


def test_comparison_forms_are_normalised(tmp_path):
    lines = [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "p", "completions": ["a", "b", "c", "d"], "ranking": [[2, 0], 1, [3]]},
        {"prompt": "p", "completions": ["a", "", "a"], "ranking": [[0, 2], 1]},  # empty completion allowed here
    ]
    rows, _ = formats.read_jsonl(_write(tmp_path, lines), "comparisons")
    assert rows[0] == {"prompt": "p", "completions": ["good", "bad"], "ranking": [[0], [1]]}
    assert rows[1]["ranking"] == [[0, 2], [1], [3]]
    assert rows[2]["ranking"] == [[0, 2], [1]]


def test_optional_fields_blank_lines_and_leading_bom(tmp_path):
    first = b"\xef\xbb\xbf" + json.dumps({"prompt": "x", "id": 7, "meta": {"src": "a"}}).encode()
    path = _write(tmp_path, [first, "", "   ", {"prompt": "y"}, "\t"])
    rows, report = formats.read_jsonl(path, "prompts")
    assert rows == [{"prompt": "x"}, {"prompt": "y"}]  # id/meta accepted and dropped
    assert report.bom and report.blank == 3 and report.lines == 5 and report.n_skipped == 0
    assert "blank=3" in report.summary()


def _cmp(completions, ranking, **extra):
    return {"prompt": "sort 2 1 =>", "completions": completions, "ranking": ranking, **extra}


# (kind, bad line, reason, field or None, fragment of the message)
MALFORMED = [
    ("pretrain", '{"text": "a"', "bad_json", None, "invalid JSON"),
    ("pretrain", '["a", "b"]', "not_object", None, "expected a JSON object, got list"),
    ("demos", {"prompt": "x =>"}, "missing_field", "completion", "is missing"),
    ("pretrain", {"text": 3}, "wrong_type", "text", "expected a string, got int"),
    ("demos", {"prompt": "x", "completon": "y", "completion": "z"}, "unknown_field", "completon", "not a field"),
    ("prompts", {"prompt": "   "}, "empty_prompt", "prompt", "is empty"),
    ("demos", {"prompt": "x", "completion": ""}, "empty_completion", "completion", "is empty"),
    ("pretrain", {"text": ""}, "empty_text", "text", "is empty"),
    ("comparisons", _cmp(["a"], [0]), "bad_k", "completions", "K=1 completions; need 2..9"),
    ("comparisons", _cmp([str(i) for i in range(10)], list(range(10))), "bad_k", "completions", "K=10"),
    ("comparisons", _cmp("a b", [0, 1]), "wrong_type", "completions", "expected a list"),
    ("comparisons", _cmp(["a", 3], [0, 1]), "wrong_type", "completions", "completion 1 is a int"),
    ("comparisons", _cmp(["a", "b", "c"], [0, 2]), "bad_ranking", "ranking", "indices [1] missing"),
    ("comparisons", _cmp(["a", "b", "c", "d"], [0, 1, 2, 1]), "bad_ranking", "ranking", "index 1 appears twice"),
    ("comparisons", _cmp(["a", "b", "c", "d"], [0, 1, 2, 4]), "bad_ranking", "ranking", "index 4 out of range"),
    ("comparisons", _cmp(["a", "b", "c"], [[0, 1, 2]]), "all_tied", "ranking", "no ordered pair"),
    ("comparisons", _cmp(["a", "b", "c"], [[0, [1]], 2]), "bad_ranking", "ranking", "deeper than one level"),
    ("comparisons", _cmp(["a", "b", "c"], [[], 0, 1, 2]), "bad_ranking", "ranking", "empty tie group"),
    ("comparisons", _cmp(["a", "b"], "01"), "wrong_type", "ranking", "non-empty list"),
    ("comparisons", _cmp(["a", "b"], [True, 0]), "wrong_type", "ranking", "neither an integer"),
    ("comparisons", _cmp(["a", "b"], [0, 1], extra=1), "unknown_field", "extra", "not a field"),
    ("comparisons", {"prompt": "p", "chosen": "same", "rejected": "same"}, "identical_completions", "rejected", "same"),
    ("comparisons", _cmp(["a", "b", "a"], [0, 1, 2]), "identical_completions", "ranking", "0 and 2 are identical"),
    ("comparisons", {"prompt": "p", "chosen": "a"}, "missing_field", "rejected", "is missing"),
    ("prompts", b'{"prompt": "caf\xe9"}', "not_utf8", None, "not valid UTF-8 (byte 0xe9"),
    ("prompts", b'\xef\xbb\xbf{"prompt": "x"}', "bom", None, "byte order mark"),
    ("pretrain", json.dumps({"text": "a " * (formats.MAX_LINE_BYTES // 2 + 1)}), "line_too_long", None, "over the"),
]


@pytest.mark.parametrize(
    "kind,line,reason,field,fragment", MALFORMED, ids=[f"{m[2]}-{i}" for i, m in enumerate(MALFORMED)]
)
def test_malformed_line_raises_naming_file_line_field(tmp_path, kind, line, reason, field, fragment):
    path = _write(tmp_path, [GOOD[kind], line, GOOD[kind]])
    with pytest.raises(formats.DataError) as info:
        formats.read_jsonl(path, kind)
    err = info.value
    assert str(err).startswith(f"{path}:2: "), str(err)
    assert (err.line, err.reason, err.field) == (2, reason, field)
    if field:
        assert f"field '{field}'" in str(err)
    assert fragment in str(err)


@pytest.mark.parametrize(
    "kind,line,reason,field,fragment", MALFORMED, ids=[f"{m[2]}-{i}" for i, m in enumerate(MALFORMED)]
)
def test_malformed_line_is_counted_when_skipping(tmp_path, kind, line, reason, field, fragment):
    path = _write(tmp_path, [GOOD[kind], line, GOOD[kind]])
    rows, report = formats.read_jsonl(path, kind, skip_bad=True)
    assert len(rows) == 2 and report.skipped == {reason: 1} and report.lines == 3
    assert report.examples[0].startswith(f"{path}:2: ") and fragment in report.examples[0]


def test_skips_are_counted_by_reason_and_logged(tmp_path, caplog):
    lines = [GOOD["demos"], "{bad", {"prompt": "x"}, "[1]", "{worse", GOOD["demos"]]
    with caplog.at_level(logging.WARNING):
        rows, report = formats.read_jsonl(_write(tmp_path, lines), "demos", skip_bad=True)
    assert len(rows) == 2 and report.skipped == {"bad_json": 2, "missing_field": 1, "not_object": 1}
    assert "bad_json=2" in report.summary() and "skipped bad lines" in caplog.text


def test_a_file_with_no_valid_row_is_an_error(tmp_path):
    with pytest.raises(formats.DataError, match="no valid prompts rows"):
        formats.read_jsonl(_write(tmp_path, ["{bad", ""]), "prompts", skip_bad=True)
    with pytest.raises(ValueError, match="unknown data kind"):
        formats.read_jsonl(_write(tmp_path, [GOOD["prompts"]]), "prompt")


def test_write_jsonl_round_trips(tmp_path):
    rows = [{"text": "ünïcode ok"}, {"text": "b"}]
    assert formats.write_jsonl(tmp_path / "x.jsonl", rows) == 2
    assert formats.read_jsonl(tmp_path / "x.jsonl", "pretrain")[0] == rows


def _reference_pairs(ranking):
    """Brute force: every pair of indices whose tie groups differ, winner = the earlier group."""
    group_of = {i: g for g, grp in enumerate(ranking) for i in ([grp] if isinstance(grp, int) else grp)}
    pairs = set()
    for i, j in itertools.permutations(group_of, 2):
        if group_of[i] < group_of[j]:
            pairs.add((i, j))
    return pairs


def test_ranking_pairs():
    assert formats.ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert formats.ranking_pairs([[0, 2], 1, 3]) == [(0, 1), (2, 1), (0, 3), (2, 3), (1, 3)]  # C(4,2) - 1 tie
    assert formats.ranking_pairs([[0], [1]]) == [(0, 1)]
    rng = random.Random(0)
    for _ in range(50):
        k = rng.randint(2, 9)
        perm = rng.sample(range(k), k)
        cuts = sorted(rng.sample(range(1, k), rng.randint(1, k - 1)))
        ranking = [perm[a:b] for a, b in zip([0, *cuts], [*cuts, k], strict=True)]
        pairs = formats.ranking_pairs(ranking)
        assert len(pairs) == len(set(pairs)) and set(pairs) == _reference_pairs(ranking)
        ties = sum(len(g) * (len(g) - 1) // 2 for g in ranking)
        assert len(pairs) == k * (k - 1) // 2 - ties


def test_truncate_keeps_response_and_cuts_prompt_from_the_left():
    stats = formats.TruncationStats()
    eos = 1
    p, r = formats.truncate([10, 11, 12], [20, eos], 8, stats)
    assert (p, r) == ([10, 11, 12], [20, eos])  # fits: unchanged, counted as seen only
    p, r = formats.truncate([10, 11, 12, 13, 14], [20, 21, eos], 5, stats)
    assert (p, r) == ([13, 14], [20, 21, eos])  # the end of the prompt survives
    assert stats.as_dict() == {
        "sequences": 2,
        "prompts_cut": 1,
        "responses_cut": 0,
        "prompt_tokens_removed": 3,
        "response_tokens_removed": 0,
    }


def test_truncate_cuts_the_response_only_past_min_prompt_and_loses_eos():
    stats = formats.TruncationStats()
    p, r = formats.truncate([10, 11, 12], [20, 21, 22, 23, 1], 4, stats, min_prompt_tokens=1)
    assert (p, r) == ([12], [20, 21, 22])  # EOS gone: a cut response must not teach stopping there
    assert stats.as_dict() == {
        "sequences": 1,
        "prompts_cut": 1,
        "responses_cut": 1,
        "prompt_tokens_removed": 2,
        "response_tokens_removed": 2,
    }
    p, r = formats.truncate(list(range(10)), [], 4, stats)  # a prompt alone (PPO / eval)
    assert (p, r) == ([6, 7, 8, 9], []) and stats.sequences == 2 and stats.prompts_cut == 2
    assert formats.truncate([5, 6], [7], 3) == ([5, 6], [7])  # stats are optional
    with pytest.raises(ValueError, match="cannot hold"):
        formats.truncate([1], [2], 1)

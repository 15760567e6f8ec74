"""The synthetic instruction world: determinism, valid files, gold score, labeler agreement, the corpus."""

import dataclasses
import itertools
import json
import math
import pathlib
import random
import subprocess
import sys
import time

import pytest

from instructjax.data import formats, world, world_tasks, world_writers
from instructjax.tokenizer import load_tokenizer

KIND_OF = {
    "pretrain_train": "pretrain",
    "pretrain_heldout": "pretrain",
    "demos_train": "demos",
    "demos_valid": "demos",
    "comparisons_train": "comparisons",
    "comparisons_valid": "comparisons",
    "prompts_train": "prompts",
    "prompts_valid": "prompts",
    "prompts_test": "prompts",
}
SMALL = world.WorldSizes(
    pretrain_train=300,
    pretrain_heldout=50,
    demos_train=100,
    demos_valid=20,
    comparisons_train=60,
    comparisons_valid=10,
    prompts_train=30,
    prompts_valid=30,
    prompts_test=30,
)


@pytest.fixture(scope="module")
def default_world(tmp_path_factory):
    """The default-size world, timed: generation must stay well under 30 s on this 2-core machine."""
    out = tmp_path_factory.mktemp("world")
    start = time.perf_counter()
    info = world.write_world(out, seed=0)
    return out, info, time.perf_counter() - start


def _read_all(out):
    return {name: formats.read_jsonl(out / f"{name}.jsonl", kind)[0] for name, kind in KIND_OF.items()}


def test_default_world_is_fast_and_sized(default_world):
    out, info, seconds = default_world
    assert seconds < 30, f"default world took {seconds:.1f} s"
    sizes = dataclasses.asdict(world.WorldSizes())
    assert {name: len(rows) for name, rows in _read_all(out).items()} == {n: sizes[n] for n in KIND_OF}
    assert json.loads((out / "world.json").read_text())["files"] == info["files"]


def test_files_validate_and_stay_in_vocabulary(default_world):
    out, _, _ = default_world
    data = _read_all(out)  # read_jsonl raises on any malformed line
    vocab = set(world_tasks.VOCAB) - {world_tasks.PAD, world_tasks.EOS, world_tasks.UNK}
    for name, rows in data.items():
        for row in rows:
            texts = [v for v in row.values() if isinstance(v, str)] + row.get("completions", [])
            assert set(" ".join(texts).split()) <= vocab, (name, row)
    for row in data["comparisons_train"] + data["comparisons_valid"]:
        assert world.WorldSizes.k_min <= len(row["completions"]) <= world.WorldSizes.k_max
    tok = load_tokenizer(out)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (len(world_tasks.VOCAB), 0, 1) and tok.vocab_size <= 400
    row = data["demos_train"][0]
    assert (
        tok.decode(tok.encode(row["prompt"]) + tok.encode(row["completion"])) == f"{row['prompt']} {row['completion']}"
    )


def test_prompt_sets_are_disjoint_and_held_out_from_pretraining(default_world):
    out, _, _ = default_world
    data = _read_all(out)
    sets = {name: [r["prompt"] for r in rows] for name, rows in data.items() if "prompt" in rows[0]}
    for name, prompts in sets.items():
        assert len(set(prompts)) == len(prompts), f"duplicate prompts in {name}"
    for a, b in itertools.combinations(sets, 2):
        assert not set(sets[a]) & set(sets[b]), f"{a} and {b} share prompts"
    held_out = set().union(*(sets[s] for s in ("prompts_test", "prompts_valid", "demos_valid", "comparisons_valid")))
    seen = set()
    for row in data["pretrain_train"] + data["pretrain_heldout"]:
        words, start = row["text"].split(), None
        for i, w in enumerate(words):
            start = i if w in world_tasks.FAMILIES else start
            if w == world_tasks.ANSWER_MARK:
                seen.add(" ".join(words[start : i + 1]))
    assert len(seen) > 10_000 and not seen & held_out


def test_same_seed_same_bytes_other_seed_other_world(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        world.write_world(tmp_path / name, seed=seed, sizes=SMALL)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 11
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "pretrain_train.jsonl").read_bytes() != (
        tmp_path / "c" / "pretrain_train.jsonl"
    ).read_bytes()
    assert (tmp_path / "a" / "prompts_test.jsonl").read_bytes() != (tmp_path / "c" / "prompts_test.jsonl").read_bytes()


def test_world_sizes_are_checked():
    with pytest.raises(ValueError, match="k_min <= k_max"):
        world.WorldSizes(k_min=3, k_max=10)
    with pytest.raises(ValueError, match="at least one row"):
        world.WorldSizes(prompts_test=0)


@pytest.mark.parametrize(
    "prompt,answer",
    [
        ("copy cat 3 dog =>", "cat 3 dog"),
        ("first 4 9 1 =>", "4"),
        ("last 4 9 1 =>", "1"),
        ("length cat cat dog =>", "3"),
        ("reverse cat dog egg =>", "egg dog cat"),
        ("max 4 19 1 =>", "19"),
        ("min 4 19 1 =>", "1"),
        ("add 12 7 =>", "19"),
        ("subtract 12 7 =>", "5"),
        ("count dog in cat dog dog =>", "2"),
        ("dedupe cat dog cat egg dog =>", "cat dog egg"),
        ("sort 14 3 9 3 =>", "3 3 9 14"),
    ],
)
def test_solve_each_family(prompt, answer):
    assert world_tasks.solve(prompt) == answer.split()
    assert world_tasks.gold_score(prompt, answer, True) == 1.0


@pytest.mark.parametrize(
    "prompt,response,stopped,expected",
    [
        ("sort 5 2 9 =>", "2 5 9", True, 1.0),
        ("sort 5 2 9 =>", "2 5 9", False, 0.5),
        ("sort 5 2 9 =>", "2 5 8", True, 1 - 0.25 / 3),
        ("sort 5 2 9 =>", "2 9 5", True, 1 / 3),
        ("sort 5 2 9 =>", "2 5 9 . sort 1 3 =>", True, 3 / 8),
        ("sort 5 2 9 =>", "reverse cat dog =>", True, 0.0),
        ("sort 5 2 9 =>", "", True, 0.0),
        ("add 12 7 =>", "18", True, 0.75),
        ("add 12 7 =>", "21", True, 0.5),
        ("add 12 7 =>", "15", True, 0.0),
        ("reverse cat dog =>", "dog", False, 0.25),
    ],
)
def test_gold_score_worked_examples(prompt, response, stopped, expected):
    assert world_tasks.gold_score(prompt, response, stopped) == pytest.approx(expected)


def test_gold_score_range_and_input_checks():
    rng = random.Random(0)
    for _ in range(500):
        prompt = world_tasks.sample_prompt(rng)
        text, stopped = world_writers.write_completion(
            prompt, rng, world_writers.Style(p_answer=0.5, p_correct=0.3, p_nostop=0.3)
        )
        assert 0.0 <= world_tasks.gold_score(prompt, text, stopped) <= 1.0
        assert len(prompt.split()) <= 12 and len(world_tasks.solve(prompt)) <= 8
    with pytest.raises(ValueError, match="text before EOS"):
        world_tasks.gold_score("add 1 2 =>", "3 <eos>", True)
    for bad in ("add 1 =>", "sort a b =>", "fly 1 2 =>", "add 1 2", "count dog cat dog =>"):
        with pytest.raises(ValueError, match="not a world prompt"):
            world_tasks.gold_score(bad, "3", True)


def _mean_gold(style, n=400, seed=0):
    rng = random.Random(seed)
    total = 0.0
    for _ in range(n):
        prompt = world_tasks.sample_prompt(rng)
        total += world_tasks.gold_score(prompt, *world_writers.write_completion(prompt, rng, style))
    return total / n


def test_writer_styles_are_ordered_by_quality():
    labeler, sft, base = (_mean_gold(s) for s in (world_writers.LABELER, world_writers.SFT, world_writers.BASE))
    assert labeler > 0.7 and labeler > sft + 0.1 and sft > base + 0.2
    # Without the closing-period habit the labelers' answers are nearly perfect: the habit is what costs.
    assert _mean_gold(dataclasses.replace(world_writers.LABELER, p_period=0.0)) > 0.95
    assert _mean_gold(dataclasses.replace(world_writers.SFT, p_nostop=1.0)) == pytest.approx(
        sft * world_tasks.STOP_FACTOR, rel=0.1
    )


def test_demonstrations_carry_the_period_habit_and_comparisons_see_short_answers():
    rng = random.Random(0)
    prompts = [world_tasks.sample_prompt(rng) for _ in range(2000)]
    demos = [world_writers.write_completion(p, rng, world_writers.LABELER)[0] for p in prompts]
    assert 0.55 < sum(d.endswith(" .") for d in demos) / len(demos) < 0.65
    assert world_tasks.gold_score("sort 5 2 9 =>", "2 5 9 .", True) == pytest.approx(0.75)
    sft = [world_writers.write_completion(p, rng, world_writers.SFT)[0] for p in prompts]
    assert 0.02 < sum(t == "" for t in sft) / len(sft) < 0.1  # empty answers exist, so the RM learns they are bad


def test_labeler_ranking_follows_gold_score_and_ties_identical_texts():
    prompt = "sort 5 2 9 =>"
    texts = ["2 9 5", "2 5 9", "2 5 8", "2 5 9", "reverse cat dog =>"]
    assert world.simulated_ranking(prompt, texts, random.Random(0), temperature=0) == [[1, 3], [2], [0], [4]]
    assert world.simulated_ranking(prompt, ["2 5 9", "2 5 9"], random.Random(0), stopped=[True, False]) == [[0], [1]]
    # Bradley-Terry marginal: P("2 5 9" beats "2 5 8") = sigmoid((1 - 0.9167) / T).
    rng, n = random.Random(1), 4000
    wins = sum(world.simulated_ranking(prompt, ["2 5 8", "2 5 9"], rng)[0] == [1] for _ in range(n))
    p = 1 / (1 + math.exp(-(1 / 12) / world.LABELER_TEMPERATURE))
    assert abs(wins / n - p) < 0.03


def test_two_labelers_agree_on_about_73_percent_of_sft_pairs():
    # Seeds other than the tuning seed (0): the paper's 72.6 +- 1.5% must hold out of sample.
    for seed in (11, 12):
        agreement = world.labeler_agreement(seed=seed, n_prompts=2000)
        assert 0.70 <= agreement <= 0.76, agreement
    assert world.labeler_agreement(seed=11, n_prompts=500, temperature=0.02) > 0.9  # less noise, more agreement
    assert world.labeler_agreement(seed=11, n_prompts=500, temperature=50.0) < 0.56  # pure noise: a coin flip


def test_pretraining_corpus_continues_prompts_with_instructions(default_world):
    out, info, _ = default_world
    texts = [r["text"] for r in formats.read_jsonl(out / "pretrain_train.jsonl", "pretrain")[0]]
    stats = world_writers.corpus_stats(texts)
    # The base-model failure in a checkable proxy: after "=>" the web mostly writes another instruction, and
    # a correct answer is the exception.
    assert stats["instruction"] > 0.5 and stats["correct_answer"] < 0.3, stats
    assert stats == info["pretrain_after_mark"]
    # Demonstrations, by contrast, answer and stop (most of them after a closing "." the gold score counts).
    demos = formats.read_jsonl(out / "demos_train.jsonl", "demos")[0]
    mean_demo = sum(world_tasks.gold_score(d["prompt"], d["completion"], True) for d in demos) / len(demos)
    assert mean_demo > 0.7 and all(d["completion"].split()[0] not in world_tasks.FAMILIES for d in demos)


def test_script_writes_a_world(tmp_path):
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic_data.py"
    args = [f"--{k}={v}" for k, v in dataclasses.asdict(SMALL).items()]
    result = subprocess.run(
        [sys.executable, str(script), f"--out={tmp_path}", "--seed=5", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    summary = json.loads(result.stdout)
    assert summary["seed"] == 5 and summary["files"]["demos_train.jsonl"] == SMALL.demos_train
    assert (tmp_path / "world.json").exists() and (tmp_path / "tokenizer.json").exists()

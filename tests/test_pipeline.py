"""TFDS builders and grain pipelines on a small synthetic world."""

import itertools
import json
import pathlib
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from instructjax.data import formats, pipeline, tfds_builder
from instructjax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def world_dir(small_world):
    return small_world


@pytest.fixture(scope="module")
def fmt(world_dir):
    return pipeline.TextFormat(load_tokenizer(world_dir / "tokenizer.json"), max_len=32, max_prompt_len=16)


def sources(world_dir, kind, **splits):
    return tfds_builder.build(kind, {k: world_dir / v for k, v in splits.items()}, world_dir / "tfds")


def test_build_is_keyed_by_input_contents(world_dir, tmp_path):
    demo = tmp_path / "d.jsonl"
    demo.write_text((world_dir / "demos_valid.jsonl").read_text())
    first = tfds_builder.dataset_dir("demos", {"train": demo}, tmp_path, False)
    src = tfds_builder.build("demos", {"train": demo}, tmp_path)["train"]
    assert len(src) == 20 and first.exists()
    assert tfds_builder.dataset_dir("demos", {"train": demo}, tmp_path, False) == first  # reused
    demo.write_text(demo.read_text() + json.dumps({"prompt": "copy cat =>", "completion": "cat"}) + "\n")
    changed = tfds_builder.dataset_dir("demos", {"train": demo}, tmp_path, False)
    assert changed != first
    assert len(tfds_builder.build("demos", {"train": demo}, tmp_path)["train"]) == 20 + 1


@pytest.mark.slow
def test_processes_building_the_same_dataset_at_once_all_succeed(world_dir, tmp_path):
    # An ablation's worker processes start their runs together and build the same prompts dataset.
    # Four processes wait for one start time, then build into one root; unlocked, the later ones failed
    # to rename their copy onto the first's (FileExistsError).
    demo = tmp_path / "d.jsonl"
    demo.write_text((world_dir / "demos_valid.jsonl").read_text())
    start = time.time() + 20  # past every process's imports
    script = textwrap.dedent(f"""
        import time
        from instructjax.data import tfds_builder
        time.sleep(max(0.0, {start} - time.time()))
        print(len(tfds_builder.build("demos", {{"train": {str(demo)!r}}}, {str(tmp_path / "tfds")!r})["train"]))
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.split()[-1] == "20"


def test_bad_line_fails_the_build_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "copy cat =>", "completion": "cat"}\n{"prompt": "x"}\n')
    with pytest.raises(formats.DataError, match=r"bad.jsonl:2: field 'completion'"):
        tfds_builder.build("demos", {"train": bad}, tmp_path)
    src = tfds_builder.build("demos", {"train": bad}, tmp_path, skip_bad=True)["train"]
    assert len(src) == 1


def test_sft_batches_mask_the_prompt(world_dir, fmt):
    src = sources(world_dir, "demos", valid="demos_valid.jsonl")["valid"]
    batch = next(iter(pipeline.sft_batches(src, fmt, batch_size=4, seed=0, shuffle=False, shard=(0, 1))))
    assert batch["tokens"].shape == (4, 32) and batch["row_valid"].all()
    row = tfds_builder.decode(src[0], "demos")
    tok = fmt.tokenizer
    n_prompt = len(fmt.prompt_ids(row["prompt"]))
    n = int(batch["mask"][0].sum())
    assert tok.decode(batch["tokens"][0, :n_prompt]) == row["prompt"]
    assert batch["tokens"][0, n - 1] == tok.eos_id  # the response ends with EOS, which is in the loss
    np.testing.assert_array_equal(np.flatnonzero(batch["loss_mask"][0]), np.arange(n_prompt, n))
    with_prompt = pipeline.TextFormat(tok, max_len=32, max_prompt_len=16, prompt_in_loss=True)
    b2 = next(iter(pipeline.sft_batches(src, with_prompt, batch_size=4, seed=0, shuffle=False, shard=(0, 1))))
    np.testing.assert_array_equal(np.flatnonzero(b2["loss_mask"][0]), np.arange(1, n))


def test_rm_batches_keep_a_prompts_completions_together(world_dir, fmt):
    src = sources(world_dir, "comparisons", train="comparisons_train.jsonl")["train"]
    rows = [tfds_builder.decode(src[i], "comparisons") for i in range(len(src))]
    assert {len(r["completions"]) for r in rows} >= {4, 9} or len({len(r["completions"]) for r in rows}) > 3
    it = iter(pipeline.comparison_batches(src, fmt, batch_size=8, seed=0, shuffle=False, shard=(0, 1)))
    batch = next(it)
    assert batch["tokens"].shape == (8, 9, 32) and batch["pair_mask"].shape == (8, 9, 9)
    for b in range(8):
        row = rows[b]
        k = len(row["completions"])
        np.testing.assert_array_equal(batch["valid"][b], np.arange(9) < k)
        assert not batch["mask"][b, k:].any() and not batch["pair_mask"][b, k:].any()
        for i, completion in enumerate(row["completions"]):
            n = int(batch["mask"][b, i].sum())
            assert batch["tokens"][b, i, n - 1] == fmt.tokenizer.eos_id
            assert fmt.tokenizer.decode(batch["tokens"][b, i, : n - 1]).endswith(completion)
        expected = np.zeros((9, 9), int)
        for w, loser in formats.ranking_pairs(row["ranking"]):
            expected[w, loser] = 1
        np.testing.assert_array_equal(batch["pair_mask"][b], expected)


def test_shuffled_pairs_variant_has_one_pair_per_element(world_dir, fmt):
    src = sources(world_dir, "comparisons", train="comparisons_train.jsonl")["train"]
    total = sum(
        len(formats.ranking_pairs(tfds_builder.decode(src[i], "comparisons")["ranking"])) for i in range(len(src))
    )
    ds = pipeline.comparison_batches(
        src, fmt, batch_size=16, seed=0, pairs_as_examples=True, num_epochs=1, shard=(0, 1)
    )
    batches = list(ds)
    assert sum(int(b["row_valid"].sum()) for b in batches) == total
    b = batches[0]
    assert b["tokens"].shape == (16, 2, 32)
    np.testing.assert_array_equal(b["pair_mask"][0], [[0, 1], [0, 0]])


def test_pretrain_packing_with_segments(world_dir, fmt):
    src = sources(world_dir, "pretrain", train="pretrain_train.jsonl")["train"]
    batch = next(iter(pipeline.pretrain_batches(src, fmt.tokenizer, seq_len=256, batch_size=4, seed=0, shard=(0, 1))))
    seg = batch["segment_ids"]
    assert seg.shape == (4, 256) and seg.max() >= 2  # several documents per row
    assert (batch["mask"] == (seg > 0)).all()
    starts = np.flatnonzero(np.diff(seg[0], prepend=-1) != 0)
    assert not batch["loss_mask"][0, starts].any()  # a document's first token is not predicted
    ends = [s - 1 for s in starts[1:] if seg[0, s] > 0]
    assert all(batch["tokens"][0, e] == fmt.tokenizer.eos_id for e in ends)


def test_prompts_left_padded_and_eval_batches_padded(world_dir, fmt):
    src = sources(world_dir, "prompts", test="prompts_test.jsonl")["test"]
    batches = list(pipeline.prompt_batches(src, fmt, batch_size=8, seed=0, shuffle=False, num_epochs=1, shard=(0, 1)))
    assert [int(b["row_valid"].sum()) for b in batches] == [8, 8, 4]
    b = batches[0]
    assert b["prompt"].shape == (8, 16)
    assert (b["prompt_mask"][:, -1] == 1).all()  # left padding: the last column is always real
    row = tfds_builder.decode(src[0], "prompts")
    assert fmt.tokenizer.decode(b["prompt"][0][b["prompt_mask"][0] == 1]) == row["prompt"]


def test_shuffle_is_seeded_and_process_shards_are_disjoint(world_dir, fmt):
    src = sources(world_dir, "demos", train="demos_train.jsonl")["train"]

    def first_tokens(seed, shard=(0, 1), n=3):
        it = iter(pipeline.sft_batches(src, fmt, batch_size=4, seed=seed, shard=shard))
        return np.concatenate([next(it)["tokens"] for _ in range(n)])

    np.testing.assert_array_equal(first_tokens(1), first_tokens(1))
    assert not np.array_equal(first_tokens(1), first_tokens(2))
    epoch = lambda shard: {
        tuple(t) for b in pipeline.sft_batches(src, fmt, 10, 0, num_epochs=1, shard=shard) for t in b["tokens"]
    }
    a, b = epoch((0, 2)), epoch((1, 2))
    assert len(a) + len(b) >= 95 and not (a & b - {tuple(np.zeros(32, int))})


def test_finite_pass_gives_every_process_the_same_number_of_batches(world_dir, fmt):
    src = sources(world_dir, "prompts", test="prompts_test.jsonl")["test"]  # 20 prompts, global batches 6, 6, 6, 2
    shards = [
        list(pipeline.prompt_batches(src, fmt, batch_size=6, seed=0, num_epochs=1, shard=(p, 3))) for p in range(3)
    ]
    assert [len(b) for b in shards] == [4, 4, 4]
    assert [int(b[-1]["row_valid"].sum()) for b in shards] == [2, 0, 0]  # an empty slice is all padding
    assert sum(int(b["row_valid"].sum()) for batches in shards for b in batches) == 20


def test_process_slices_make_up_the_single_process_batch(world_dir, fmt):
    """Multi-host: concatenated in process order, the processes' rows are exactly one process's batch."""
    demos = sources(world_dir, "demos", train="demos_train.jsonl")["train"]
    text = sources(world_dir, "pretrain", train="pretrain_train.jsonl")["train"]
    makers = {
        "sft": lambda shard: pipeline.sft_batches(demos, fmt, 8, seed=4, shard=shard),
        "pretrain": lambda shard: pipeline.pretrain_batches(text, fmt.tokenizer, 32, 8, seed=4, shard=shard),
    }
    for name, make in makers.items():
        whole = list(itertools.islice(iter(make((0, 1))), 3))
        parts = [list(itertools.islice(iter(make((p, 2))), 3)) for p in range(2)]
        for n, batch in enumerate(whole):
            for key, value in batch.items():
                joined = np.concatenate([parts[0][n][key], parts[1][n][key]])
                np.testing.assert_array_equal(joined, value, err_msg=f"{name} batch {n} {key}")
    with pytest.raises(ValueError, match="not a multiple of the 3 blocks"):
        next(iter(pipeline.sft_batches(demos, fmt, 8, seed=0, shard=(0, 3))))


def test_truncation_is_counted(world_dir):
    tok = load_tokenizer(world_dir / "tokenizer.json")
    short = pipeline.TextFormat(tok, max_len=8, max_prompt_len=4)
    src = sources(world_dir, "demos", valid="demos_valid.jsonl")["valid"]
    next(iter(pipeline.sft_batches(src, short, batch_size=4, seed=0, shuffle=False, shard=(0, 1))))
    assert short.stats.prompts_cut > 0 and short.stats.prompt_tokens_removed > 0


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys, numpy as np
    from instructjax.data import pipeline, tfds_builder
    from instructjax.tokenizer import load_tokenizer
    world_dir, state, out = sys.argv[1], sys.argv[2], sys.argv[3]
    import pathlib; world_dir = pathlib.Path(world_dir)
    fmt = pipeline.TextFormat(load_tokenizer(world_dir / "tokenizer.json"), max_len=32, max_prompt_len=16)
    src = tfds_builder.build("comparisons", {"train": world_dir / "comparisons_train.jsonl"}, world_dir / "tfds")
    it = iter(pipeline.comparison_batches(src["train"], fmt, batch_size=4, seed=3, shard=(0, 1)))
    it.set_state(json.loads(open(state).read()))
    np.savez(out, **next(it))
    """
)


def test_iterator_state_resumes_exactly_in_a_fresh_process(world_dir, fmt, tmp_path):
    src = sources(world_dir, "comparisons", train="comparisons_train.jsonl")["train"]
    it = iter(pipeline.comparison_batches(src, fmt, batch_size=4, seed=3, shard=(0, 1)))
    for _ in range(13):  # past the first epoch (40 prompts / 4): the state includes the epoch reshuffle
        next(it)
    state = tmp_path / "state.json"
    state.write_text(json.dumps(it.get_state()))
    expected = next(it)
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    out = tmp_path / "next.npz"
    subprocess.run(
        [sys.executable, str(script), str(world_dir), str(state), str(out)],
        check=True,
        cwd=pathlib.Path(__file__).parent,
    )
    got = np.load(out)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)

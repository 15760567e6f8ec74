"""Public datasets in: the readers (jsonl, json, parquet, save_to_disk), the four schema adapters with their
malformed cases, chat templates, and ``scripts/prepare_data.py`` writing the nine files.

Every fixture is written here, in each dataset's schema, with made-up text (no copy of a real dataset)."""

import json
import pathlib
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructjax import chat_template, stages
from instructjax.data import formats, prepare, public, sources
from instructjax.data.sources import Record

REPO = pathlib.Path(__file__).resolve().parents[1]
GPT2 = REPO / "tests/fixtures/hf/gpt2"
# A ChatML-style template of the kind Qwen2 instruct models ship, with the checks real templates make.
CHATML = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def rec(data, number=7, path="data/train.jsonl"):
    return Record(path, number, data)


def fails(adapter, data, reason, field, **kw):
    with pytest.raises(formats.DataError) as e:
        adapter(rec(data), **kw)
    assert e.value.reason == reason and e.value.field == field, (e.value.reason, e.value.field, str(e.value))
    assert str(e.value).startswith(f"data/train.jsonl:7: field '{field}'"), str(e.value)


# ---------------------------------------------------------------------------------------------- HH-RLHF

H1 = "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in water.\n\nHuman: For how long?\n\nAssistant:"


def test_hh_prompt_is_the_shared_dialogue_and_completions_the_last_turns():
    ex = public.hh(rec({"chosen": H1 + " About nine minutes.", "rejected": H1 + " Forever."}))
    assert ex.text == H1 and ex.completions == [" About nine minutes.", " Forever."] and ex.ranking == [[0], [1]]
    assert ex.messages == [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Put it in water."},
        {"role": "user", "content": "For how long?"},
    ]
    assert public.plain_dialogue(ex.messages) == H1  # the plain format is HH's own


@pytest.mark.parametrize(
    "data, reason, field",
    [
        ({"chosen": H1 + " Nine."}, "missing_field", "rejected"),
        ({"chosen": ["not", "text"], "rejected": H1 + " No."}, "wrong_type", "chosen"),
        ({"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi"}, "no_assistant_turn", "chosen"),
        ({"chosen": H1 + " Nine.", "rejected": H1.replace("egg", "potato") + " No."}, "prefixes_differ", "rejected"),
        ({"chosen": H1 + " Nine.\n\nHuman: thanks", "rejected": H1 + " No."}, "ends_with_human", "chosen"),
        ({"chosen": "Preamble" + H1 + " Nine.", "rejected": H1 + " No."}, "no_human_turn", "chosen"),
        ({"chosen": "\n\nAssistant: hello\n\nHuman: x\n\nAssistant: y", "rejected": H1}, "no_human_turn", "chosen"),
        ("a string, not an object", "not_object", None),
    ],
)
def test_hh_malformed_records_name_the_field(data, reason, field):
    if field is None:
        with pytest.raises(formats.DataError, match="expected an object") as e:
            public.hh(rec(data))
        assert e.value.reason == reason
        return
    fails(public.hh, data, reason, field)


# ---------------------------------------------------------------------------------------------- TL;DR


def tldr_comparison(choice=1, **info):
    info = {"id": "t3_x", "post": "My cat knocks cups off the table.", "title": "Cat help", "subreddit": "cats"} | info
    return {
        "info": info,
        "summaries": [{"text": " Cat breaks cups.", "policy": "a"}, {"text": "cat bad"}],
        "choice": choice,
    }


def test_tldr_comparison_and_sft_records():
    ex = public.tldr(rec(tldr_comparison()))
    assert ex.text == "SUBREDDIT: r/cats\n\nTITLE: Cat help\n\nPOST: My cat knocks cups off the table.\n\nTL;DR:"
    assert ex.completions == [" Cat breaks cups.", " cat bad"] and ex.ranking == [[1], [0]]
    assert ex.messages == [{"role": "user", "content": ex.text}]
    demo = public.tldr(rec({"post": "Long story.", "summary": "short", "subreddit": "tifu", "title": None}))
    assert demo.text == "SUBREDDIT: r/tifu\n\nPOST: Long story.\n\nTL;DR:" and demo.completions == [" short"]
    assert demo.ranking is None
    article = public.tldr(
        rec({"info": {"article": "News text."}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0})
    )
    assert article.text == "POST: News text.\n\nTL;DR:"  # CNN/DM records: no subreddit, no title


@pytest.mark.parametrize(
    "data, reason, field",
    [
        ({"summaries": [], "choice": 0}, "missing_field", "info"),
        (tldr_comparison(post=None), "missing_field", "info.post"),
        (tldr_comparison(post="   "), "empty_post", "info.post"),
        (tldr_comparison(choice=2), "bad_choice", "choice"),
        (tldr_comparison(choice=True), "wrong_type", "choice"),
        ({**tldr_comparison(), "summaries": [{"text": "only one"}]}, "bad_k", "summaries"),
        ({**tldr_comparison(), "summaries": [{"text": "a"}, {"txt": "b"}]}, "missing_field", "summaries[1].text"),
        (tldr_comparison(title=5), "wrong_type", "info.title"),
        ({"post": "A post.", "summary": " "}, "empty_summary", "summary"),
    ],
)
def test_tldr_malformed_records_name_the_field(data, reason, field):
    fails(public.tldr, data, reason, field)


# ---------------------------------------------------------------------------------------------- UltraFeedback


def uf_completion(response, overall, aspects=(5, 4, "N/A", 3)):
    annotations = {a: {"Rating": str(r), "Rationale": "..."} for a, r in zip(public.ASPECTS, aspects, strict=True)}
    return {"model": "m", "response": response, "overall_score": overall, "annotations": annotations}


def uf(*completions):
    return {"source": "made_up", "instruction": "Name a prime.", "completions": list(completions)}


def test_ultrafeedback_is_one_k_way_ranking_with_ties():
    record = uf(uf_completion("4", 2.0), uf_completion("7", 8.5), uf_completion("2", 8.5), uf_completion("9", 1))
    ex = public.ultrafeedback(rec(record))
    assert ex.ranking == [[1, 2], [0], [3]] and ex.completions == [" 4", " 7", " 2", " 9"]
    assert ex.text == "\n\nHuman: Name a prime.\n\nAssistant:"
    assert sorted(formats.ranking_pairs(ex.ranking)) == [(0, 3), (1, 0), (1, 3), (2, 0), (2, 3)]  # no pair in the tie
    # the mean of the rated aspects ("N/A" left out) ranks differently from the overall score
    record = uf(uf_completion("4", 2.0, (5, 5, 5, 5)), uf_completion("7", 8.5, (1, "N/A", 2, 3)))
    assert public.ultrafeedback(rec(record), rating="aspects").ranking == [[0], [1]]
    assert public.ultrafeedback(rec(record), rating="overall").ranking == [[1], [0]]
    assert public.ultrafeedback(rec(uf(uf_completion("a", 3), uf_completion("b", 3)))) is None  # all tied: a skip


@pytest.mark.parametrize(
    "data, reason, field, rating",
    [
        ({"completions": []}, "missing_field", "instruction", "overall"),
        ({"instruction": " ", "completions": []}, "empty_instruction", "instruction", "overall"),
        (uf(uf_completion("a", 1)), "bad_k", "completions", "overall"),
        (uf(*[uf_completion(str(i), i) for i in range(10)]), "bad_k", "completions", "overall"),
        (uf(uf_completion("a", 1), {"overall_score": 2}), "missing_field", "completions[1].response", "overall"),
        (
            uf(uf_completion("a", 1), uf_completion("b", "high")),
            "wrong_type",
            "completions[1].overall_score",
            "overall",
        ),
        (
            uf(uf_completion("a", 1), uf_completion("b", float("nan"))),
            "bad_rating",
            "completions[1].overall_score",
            "overall",
        ),
        (
            uf(uf_completion("a", 1), uf_completion("b", 2, (1, "five", 2, 3))),
            "bad_rating",
            "completions[1].annotations.honesty",
            "aspects",
        ),
        (
            uf(uf_completion("a", 1), uf_completion("b", 2, ("N/A",) * 4)),
            "bad_rating",
            "completions[1].annotations",
            "aspects",
        ),
    ],
)
def test_ultrafeedback_malformed_records_name_the_field(data, reason, field, rating):
    fails(public.ultrafeedback, data, reason, field, rating=rating)


# ---------------------------------------------------------------------------------------------- conversational

U = {"role": "user", "content": "Say hi."}


def reply(text):
    return [{"role": "assistant", "content": text}]


def test_conversational_explicit_implicit_and_whole_conversation_forms():
    explicit = public.conversational(rec({"prompt": [U], "chosen": reply("Hi!"), "rejected": reply("No.")}))
    implicit = public.conversational(rec({"chosen": [U, *reply("Hi!")], "rejected": [U, *reply("No.")]}))
    whole = public.conversational(rec({"prompt": "Say hi.", "chosen": [U, *reply("Hi!")], "rejected": "No."}))
    for ex in (explicit, implicit, whole):
        assert ex.messages == [U] and ex.completions == [" Hi!", " No."] and ex.ranking == [[0], [1]]
        assert ex.text == "\n\nHuman: Say hi.\n\nAssistant:"


@pytest.mark.parametrize(
    "data, reason, field",
    [
        ({"prompt": [U], "chosen": reply("a")}, "missing_field", "rejected"),
        ({"prompt": [U], "chosen": {"role": "assistant"}, "rejected": reply("b")}, "wrong_type", "chosen"),
        (
            {"prompt": [{"role": "user"}], "chosen": reply("a"), "rejected": reply("b")},
            "missing_field",
            "prompt[0].content",
        ),
        ({"prompt": [U], "chosen": [{"role": "user", "content": "a"}], "rejected": reply("b")}, "bad_role", "chosen"),
        ({"prompt": [U, *reply("x")], "chosen": reply("a"), "rejected": reply("b")}, "bad_role", "prompt"),
        (
            {"chosen": [U, *reply("a")], "rejected": [{"role": "user", "content": "?"}, *reply("b")]},
            "prefixes_differ",
            "rejected",
        ),
        ({"chosen": reply("a"), "rejected": reply("b")}, "missing_field", "prompt"),
        ({"prompt": [U], "chosen": reply("a"), "rejected": []}, "wrong_type", "rejected"),
    ],
)
def test_conversational_malformed_records_name_the_field(data, reason, field):
    fails(public.conversational, data, reason, field)


# ---------------------------------------------------------------------------------------------- chat templates


def test_chat_template_found_in_tokenizer_config_and_rendered(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    template, tokens = chat_template.find_chat_template(tmp_path)
    assert template == CHATML and tokens == {"eos_token": "<|im_end|>"}
    text = chat_template.render(template, [U], special_tokens=tokens)
    assert text == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(chat_template.ChatTemplateError, match="unknown role tool"):
        chat_template.render(template, [{"role": "tool", "content": "x"}])
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ bos_token }}hi"}]
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": named, "bos_token": {"content": "<s>"}})
    )
    template, tokens = chat_template.find_chat_template(tmp_path)
    assert chat_template.render(template, [U], special_tokens=tokens) == "<s>hi"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # newer checkpoints: its own file
    assert chat_template.find_chat_template(tmp_path / "tokenizer_config.json")[0] == "{{ messages[0]['content'] }}"
    assert chat_template.find_chat_template(GPT2) == (None, chat_template.find_chat_template(GPT2)[1])
    with pytest.raises(chat_template.ChatTemplateError, match="does not parse"):
        chat_template.render("{% for %}", [U])


# ---------------------------------------------------------------------------------------------- readers


def write_layouts(tmp_path, rows_by_split):
    """The same splits as jsonl files, a json array, parquet shards and save_to_disk directories."""
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for split, rows in rows_by_split.items():
        (jsonl / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    for split, rows in rows_by_split.items():
        pq.write_table(pa.Table.from_pylist(rows), hub / f"{split}-00000-of-00001.parquet")
    saved = tmp_path / "saved"
    for split, rows in rows_by_split.items():
        (saved / split).mkdir(parents=True)
        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_stream(str(saved / split / "data-00000-of-00001.arrow"), table.schema) as writer:
            writer.write_table(table)
        state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": split}
        (saved / split / "state.json").write_text(json.dumps(state))
        (saved / split / "dataset_info.json").write_text("{}")
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": list(rows_by_split)}))
    return {"jsonl": jsonl, "hub": tmp_path / "hub", "saved": saved, "one_split": saved / "test"}


def test_every_layout_reads_the_same_records(tmp_path):
    rows = {
        "train": [{"chosen": H1 + f" {i}", "rejected": H1 + " no"} for i in range(3)],
        "test": [{"chosen": H1, "rejected": H1}],
    }
    layouts = write_layouts(tmp_path, rows)
    for name in ("jsonl", "hub", "saved"):
        splits = sources.read_splits(layouts[name])
        assert {k: [r.data for r in v] for k, v in splits.items()} == rows, name
    assert [r.number for r in sources.read_splits(layouts["jsonl"])["train"]] == [1, 2, 3]
    assert list(sources.read_splits(layouts["one_split"])) == ["test"]
    (tmp_path / "array.json").write_text(json.dumps(rows["train"]))
    assert [r.data for r in sources.read_splits(tmp_path / "array.json")["train"]] == rows["train"]
    (tmp_path / "bad.jsonl").write_text('{"chosen": "x"}\n{"chosen": \n')
    with pytest.raises(formats.DataError, match=r"bad\.jsonl:2: bad JSON"):
        sources.read_file(tmp_path / "bad.jsonl")
    (tmp_path / "object.json").write_text("{}")
    with pytest.raises(formats.DataError, match="expected a JSON array"):
        sources.read_file(tmp_path / "object.json")


def test_splits_are_mapped_by_name_and_carved_with_the_seed():
    splits = {"train": list(range(100)), "test": list(range(100, 110))}
    roles = sources.assign_splits(splits, seed=3)
    assert roles["test"] == list(range(100, 110)) and len(roles["valid"]) == 5 and len(roles["train"]) == 95
    assert sorted(roles["train"] + roles["valid"]) == list(range(100))  # nothing lost, nothing twice
    assert sources.assign_splits(splits, seed=3) == roles and sources.assign_splits(splits, seed=4) != roles
    mapped = sources.assign_splits(
        {"train_prefs": [1, 2, 3], "test_prefs": [4]},
        mapping={"train": "train_prefs", "test": "test_prefs"},
        valid_fraction=0.34,
    )
    assert mapped["test"] == [4] and len(mapped["valid"]) == 1 and len(mapped["train"]) == 2
    with pytest.raises(ValueError, match=r"splits \['train_prefs'\] have no role"):
        sources.assign_splits({"train_prefs": [1], "test": [2]})
    with pytest.raises(ValueError, match="no train split"):
        sources.assign_splits({"test": [2]})


# ---------------------------------------------------------------------------------------------- prepare


def hh_rows(n, seed=0):
    return [
        {"chosen": H1.replace("egg", f"egg {i}") + f" Nine {i}.", "rejected": H1.replace("egg", f"egg {i}") + " No."}
        for i in range(seed, seed + n)
    ]


def test_prepare_writes_nine_valid_files_and_a_report(tmp_path):
    layouts = write_layouts(tmp_path, {"train": hh_rows(40), "test": hh_rows(6, 100)})
    out = tmp_path / "out"
    report = prepare.prepare("hh", layouts["saved"], out, tokenizer=GPT2, max_len=20, max_prompt_len=10)
    assert set(report["rows"]) == set(stages.DATA_FILES)  # the nine files the pipeline reads
    for name in stages.DATA_FILES:
        kind = name.split("_")[0]
        rows, _ = formats.read_jsonl(out / f"{name}.jsonl", kind)  # every row passes the pipeline's reader
        assert len(rows) == report["rows"][name] > 0, name
    assert report["rows"]["comparisons_train"] == 38 and report["rows"]["comparisons_valid"] == 2  # 5% of train
    assert report["rows"]["prompts_test"] == 6
    demo = json.loads((out / "demos_train.jsonl").read_text().splitlines()[0])
    assert demo["prompt"].endswith("\n\nAssistant:") and demo["completion"].startswith(" Nine")
    tokens = report["tokens"]
    assert tokens["lengths"]["demos_train.prompt"]["p50"] > 10 and tokens["truncated"]["prompts_train"] == 38
    assert json.loads((out / prepare.REPORT_FILE).read_text())["rows"] == report["rows"]


def test_prepare_with_a_chat_template_and_skips_counted(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_bytes((GPT2 / "tokenizer.json").read_bytes())
    config = json.loads((GPT2 / "tokenizer_config.json").read_text()) | {"chat_template": CHATML}
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    good = [{"prompt": [U], "chosen": reply(f"Hi {i}!"), "rejected": reply("No.")} for i in range(30)]
    bad = [{"prompt": [U], "chosen": reply("same"), "rejected": reply("same")}, {"prompt": [U], "chosen": reply("a")}]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    with pytest.raises(formats.DataError, match=r"prefs\.jsonl:31: field 'ranking'"):
        prepare.prepare("conversational", data, tmp_path / "x", tokenizer=tok)
    report = prepare.prepare(
        "conversational", data, tmp_path / "out", tokenizer=tok, skip_bad=True, valid_fraction=0.1, test_fraction=0.1
    )
    assert (
        report["skipped"] == {"identical_completions": 1, "missing_field": 1}
        and "tok's chat template" in report["template"]
    )
    row = json.loads((tmp_path / "out" / "comparisons_train.jsonl").read_text().splitlines()[0])
    assert (
        row["prompt"] == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
        and row["completions"][1] == "No."
    )
    assert report["duplicates"]["prompts_train"] > 0  # one prompt, written once
    plain = prepare.prepare("conversational", data, tmp_path / "plain", tokenizer=tok, template="none", skip_bad=True)
    assert (
        json.loads((tmp_path / "plain" / "prompts_train.jsonl").read_text())["prompt"]
        == "\n\nHuman: Say hi.\n\nAssistant:"
    )
    assert plain["template"].startswith("none")


def test_tldr_sft_split_gives_demos_and_prompts_and_the_script_runs(tmp_path):
    comparisons = tmp_path / "comparisons"
    comparisons.mkdir()
    rows = [tldr_comparison(choice=i % 2, post=f"Post number {i}.") for i in range(12)]
    (comparisons / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (comparisons / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    sft = tmp_path / "sft.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"post": f"Story {i}.", "summary": f"sum {i}", "subreddit": "a", "title": "t"} for i in range(20)]
        ),
        sft,
    )
    cmd = [
        sys.executable,
        str(REPO / "scripts/prepare_data.py"),
        "--source=tldr",
        f"--input={comparisons}",
        f"--sft_input={sft}",
        f"--out={tmp_path / 'out'}",
        f"--tokenizer={GPT2}",
        f"--recipe={REPO / 'configs/recipes/tldr.py'}:smoke",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed["rows"]["comparisons_valid"] == 2 and printed["rows"]["demos_train"] == 18
    assert "truncated at max_len=" in done.stdout and "tokens demos_train.prompt" in done.stdout
    demos = (tmp_path / "out" / "demos_train.jsonl").read_text()
    assert "POST: Story" in demos and "Post number" not in demos  # demos and prompts from the SFT split
    assert "Post number" in (tmp_path / "out" / "comparisons_train.jsonl").read_text()


def test_ultrafeedback_all_tied_prompts_are_counted_skips(tmp_path):
    rows = [
        uf(uf_completion(f"a{i}", 1 + i % 3), uf_completion(f"b{i}", 2), uf_completion(f"c{i}", 9)) for i in range(20)
    ]
    rows += [uf(uf_completion("t", 4), uf_completion("u", 4))]
    (tmp_path / "uf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare.prepare("ultrafeedback", tmp_path / "uf.jsonl", tmp_path / "out")
    assert report["skipped"] == {"all_tied": 1} and report["rating"] == "overall"
    k3 = [json.loads(line) for line in (tmp_path / "out" / "comparisons_train.jsonl").read_text().splitlines()]
    assert all(len(r["completions"]) == 3 for r in k3) and any(len(r["ranking"]) == 2 for r in k3)  # 2 tied with b
    assert sum(report["rows"][f"comparisons_{s}"] for s in ("train", "valid")) + 1 == 20  # test carved out: 1

"""One Tokenizer interface over the world's WordLevel tokenizer.json, a HF BPE built here, and sentencepiece."""

import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from instructjax.data import world_tasks, world_writers
from instructjax.tokenizer import load_tokenizer

LINES = ["the cat sees a big dog", "sort 3 1 2 gives 1 2 3", "we have 3 apples and 2 pears", "the red fox eats"] * 20


def test_world_tokenizer_round_trip(tmp_path):
    world_tasks.write_tokenizer(tmp_path / "tokenizer.json")
    for path in (tmp_path, tmp_path / "tokenizer.json"):  # a directory or the file itself
        tok = load_tokenizer(path)
        assert (tok.kind, tok.pad_id, tok.eos_id, tok.vocab_size) == (
            "hf",
            world_tasks.PAD_ID,
            world_tasks.EOS_ID,
            len(world_tasks.VOCAB),
        )
    rng = random.Random(0)
    for _ in range(200):
        prompt = world_tasks.sample_prompt(rng)
        completion = world_writers.write_completion(prompt, rng, world_writers.BASE)[0]
        text = f"{prompt} {completion} {world_writers.filler_sentence(rng)[0]}"
        ids = tok.encode(text)
        assert (
            world_tasks.UNK_ID not in ids and world_tasks.EOS_ID not in ids and world_tasks.PAD_ID not in ids
        )  # no specials added
        assert len(ids) == len(text.split()) and tok.decode(ids) == text
    ids = tok.encode("sort 3 1 =>") + tok.encode("1 3")
    assert tok.decode([0, 0, *ids, 1, 0]) == "sort 3 1 => 1 3 <eos>"  # pad dropped, EOS decoded, no stop
    assert tok.decode_response([*tok.encode("1 3"), 1, 7, 0]) == ("1 3", True)
    assert tok.decode_response(tok.encode("1 3 sort")) == ("1 3 sort", False)
    assert tok.encode("sort zebra") == [tok.encode("sort")[0], world_tasks.UNK_ID]


def _bpe(special_tokens):
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        LINES, trainers.BpeTrainer(vocab_size=120, special_tokens=special_tokens, show_progress=False)
    )
    return tok


def test_hf_bpe_without_pad_gets_an_extra_id(tmp_path):
    _bpe(["<|endoftext|>"]).save(str(tmp_path / "tokenizer.json"))  # GPT-2 style: EOS only, no pad
    base = HFTokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size()
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == 0 and tok.pad_id == base and tok.vocab_size == base + 1
    ids = tok.encode("the cat sees 3 dog")
    assert tok.decode(ids) == "the cat sees 3 dog"
    assert tok.decode([tok.pad_id, *ids, tok.pad_id]) == "the cat sees 3 dog"  # the extra id never reaches HF
    assert tok.decode_response([*ids, tok.eos_id, *ids]) == ("the cat sees 3 dog", True)


def test_hf_tokenizer_config_names_eos_and_pad(tmp_path):
    _bpe(["<s>", "</s>", "<unk>", "[PAD]", "<|endoftext|>"]).save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": {"content": "<|endoftext|>", "special": True}, "pad_token": "<unk>", "bos_token": "<s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 4, 2)  # config wins over the "</s>" / "[PAD]" candidates
    assert load_tokenizer(tmp_path, eos_token="</s>", pad_token="[PAD]").eos_id == 1  # explicit args win
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(tmp_path, eos_token="<nope>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "</s>"}))
    with pytest.raises(ValueError, match="EOS and PAD are the same id"):
        load_tokenizer(tmp_path)


def test_hf_tokenizer_without_eos_is_an_error(tmp_path):
    _bpe(["<unk>"]).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no EOS token found"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    for pad_id in (-1, 3):
        prefix = tmp_path / f"sp{pad_id}"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(LINES),
            model_prefix=str(prefix),
            vocab_size=60,
            model_type="bpe",
            pad_id=pad_id,
            minloglevel=2,
        )
        tok = load_tokenizer(f"{prefix}.model")
        assert tok.kind == "sentencepiece" and tok.eos_id == 2 and tok.bos_id == 1
        # No pad piece: the extra id (= piece count); with pad_id=3 the model's own pad.
        assert (tok.pad_id, tok.vocab_size) == ((60, 61) if pad_id < 0 else (3, 60))
        ids = tok.encode("the cat eats")
        assert tok.eos_id not in ids and tok.decode([tok.pad_id, *ids]) == "the cat eats"
        assert tok.decode_response([*ids, tok.eos_id, 5]) == ("the cat eats", True)
    (tmp_path / "only").mkdir()
    (tmp_path / "sp3.model").rename(tmp_path / "only" / "x.model")
    assert load_tokenizer(tmp_path / "only").pad_id == 3  # a directory with exactly one *.model


def test_unknown_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="unknown tokenizer file type"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)

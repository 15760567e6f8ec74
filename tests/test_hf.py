"""Hugging Face interop: logit and greedy parity with transformers, round trips, sharded loading, errors.

The fixtures (``tests/fixtures/hf/<family>/``, made by ``tests/fixtures/make_hf_fixtures.py``) hold tiny
random checkpoints and what transformers computed on them, so parity is tested without torch. The
``live`` tests rerun transformers when torch is importable (CI has no torch: they skip there).
"""

import functools
import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from instructjax import checkpoint, evaluate, hf, sampling, sharding
from instructjax.model import Transformer
from instructjax.tokenizer import load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "hf"
LM_FAMILIES = ["gpt2", "llama", "mistral", "qwen2"]
ALL_FAMILIES = [*LM_FAMILIES, "llama_rm"]
TOL = 1e-4  # max abs logit difference allowed against transformers (float32)
NO_TORCH = "torch and transformers are not installed (CI); the stored fixtures cover parity without them"


@functools.cache
def loaded(family: str, **kwargs) -> hf.HFModel:
    return hf.load_hf(FIXTURES / family, **kwargs)


@functools.cache
def expected(family: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / family / "expected.npz") as f:
        return dict(f)


@functools.cache
def _apply(cfg):
    return jax.jit(lambda p, t, m: Transformer(cfg).apply({"params": p}, t, m))


def forward(model: hf.HFModel, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    mask = np.ones_like(tokens) if mask is None else mask
    return np.asarray(_apply(model.cfg)(model.params, tokens, mask))


def last_real(mask: np.ndarray) -> np.ndarray:
    return np.array([np.nonzero(row)[0][-1] for row in mask])


def rewards(model: hf.HFModel, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Our reward of each row: the scalar head at the last real token (where EOS sits)."""
    return forward(model, tokens, mask)[np.arange(len(tokens)), last_real(mask)]


def max_diff(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray | None = None) -> float:
    diff = np.abs(ours[..., : theirs.shape[-1]] - theirs)
    return float((diff if mask is None else diff[mask.astype(bool)]).max())


def greedy(model: hf.HFModel, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    gen = sampling.generate(
        model.params, model.cfg, tokens, mask, jax.random.key(0), max_new_tokens=20, eos_id=-1, temperature=0.0
    )
    return np.asarray(gen.tokens)


# --------------------------------------------------------------------------------- (a) stored parity


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_logits_and_greedy_match_stored_transformers_outputs(family):
    model, exp = loaded(family), expected(family)
    unpadded = max_diff(forward(model, exp["tokens"]), exp["logits"])
    padded = max_diff(
        forward(model, exp["padded_tokens"], exp["padded_mask"]), exp["padded_logits"], exp["padded_mask"]
    )
    print(f"{family}: max |logit diff| unpadded {unpadded:.2e}, padded {padded:.2e}")
    assert unpadded <= TOL and padded <= TOL
    np.testing.assert_array_equal(greedy(model, exp["tokens"], np.ones_like(exp["tokens"])), exp["greedy"])
    left = slice(0, 2)  # the full row and the left-padded row
    np.testing.assert_array_equal(
        greedy(model, exp["padded_tokens"][left], exp["padded_mask"][left]), exp["padded_greedy"]
    )


def test_reward_model_fixture_reads_the_offset_back():
    model, exp = loaded("llama_rm"), expected("llama_rm")
    assert model.cfg.head == "scalar" and model.info.reward_offset == 0.375
    assert float(model.params["score_head"]["bias"][0]) == 0.375
    ours = rewards(model, exp["padded_tokens"], exp["padded_mask"])
    np.testing.assert_allclose(ours, exp["scores"] + 0.375, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fixture_tokenizer_loads_through_our_interface(family):
    tok = load_tokenizer(FIXTURES / family)
    vocab = json.loads((FIXTURES / family / "config.json").read_text())["vocab_size"]
    assert (tok.kind, tok.vocab_size, tok.pad_id, tok.eos_id) == ("hf", vocab, 0, 1)
    assert tok.encode("w5 w17") == [5, 17] and tok.decode([0, 5, 17, 1]) == "w5 w17 <eos>"


# ----------------------------------------------------------------------------------- (b) live parity


@pytest.fixture(scope="module")
def transformers():
    pytest.importorskip("torch", reason=NO_TORCH)
    return pytest.importorskip("transformers", reason=NO_TORCH)


def hf_logits(transformers, directory, tokens, mask, seq_cls=False):
    import torch

    auto = transformers.AutoModelForSequenceClassification if seq_cls else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(directory, dtype=torch.float32).eval()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    return out.logits.numpy()


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_live_logits_match_transformers(transformers, family):
    model, exp = loaded(family), expected(family)
    tokens, mask = exp["padded_tokens"], exp["padded_mask"]
    theirs = hf_logits(transformers, FIXTURES / family, tokens, mask)
    np.testing.assert_allclose(theirs[mask == 1], exp["padded_logits"][mask == 1], atol=1e-5, rtol=0)  # fixture fresh
    assert max_diff(forward(model, tokens, mask), theirs, mask) <= TOL
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(FIXTURES / family / "tokenizer.json"))
    assert fast("w5 w17")["input_ids"] == load_tokenizer(FIXTURES / family).encode("w5 w17")


# ------------------------------------------------------------------------------------- (c) round trip


def reward_model(family: str, seed: int = 0) -> hf.HFModel:
    """A reward model made from a policy fixture: the same trunk with a random scalar head."""
    import dataclasses

    model = loaded(family)
    cfg = dataclasses.replace(model.cfg, head="scalar")
    rng = np.random.RandomState(seed)
    params = {k: v for k, v in model.params.items() if k != "lm_head"}
    params["score_head"] = {
        "kernel": rng.normal(0, 0.2, (cfg.d_model, 1)).astype(np.float32),
        "bias": np.array([0.7], np.float32),
    }
    return hf.HFModel(cfg, params, model.info)


def assert_same_params(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


def hf_state(directory: pathlib.Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_export_then_import_is_bit_exact(family, tmp_path):
    model = loaded(family, pad_vocab_to_multiple=8)  # exercise padding on import and stripping on export
    token_ids = {"eos_token_id": 1, "pad_token_id": 0}
    out = hf.export_hf(
        model.params,
        model.cfg,
        tmp_path,
        model_type=model.info.model_type,
        vocab_size=model.info.vocab_size,
        token_ids=token_ids,
        max_shard_size=40_000,  # several files and an index
        tokenizer=FIXTURES / family,
    )
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    again = hf.load_hf(out, pad_vocab_to_multiple=8)
    assert again.cfg == model.cfg
    assert_same_params(again.params, model.params)
    # the export reproduces the original tensors exactly (names, shapes, values)
    original = {k: v for k, v in hf_state(FIXTURES / family).items() if not hf._BUFFERS.search(k)}
    exported = hf_state(out)
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        assert np.array_equal(exported[name], value), name


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_reward_model_export_round_trip(family, tmp_path):
    rm = reward_model(family)
    hf.export_hf(rm.params, rm.cfg, tmp_path / "exact", token_ids={"pad_token_id": 0})
    config = json.loads((tmp_path / "exact" / "config.json").read_text())
    assert config["architectures"] == [hf.SEQ_CLS[family]] and config["num_labels"] == 1
    assert config[hf.REWARD_OFFSET_KEY] == float(np.float32(0.7))
    again = hf.load_hf(tmp_path / "exact")
    assert again.cfg == rm.cfg
    assert_same_params(again.params, jax.tree.map(np.asarray, rm.params))
    # with a normalisation bias, the imported head computes the normalised reward
    hf.export_hf(rm.params, rm.cfg, tmp_path / "norm", reward_bias=0.25, token_ids={"pad_token_id": 0})
    normed = hf.load_hf(tmp_path / "norm")
    np.testing.assert_allclose(float(normed.params["score_head"]["bias"][0]), 0.7 - 0.25, rtol=1e-6)
    exp = expected(family)
    np.testing.assert_allclose(
        rewards(normed, exp["padded_tokens"], exp["padded_mask"]),
        rewards(rm, exp["padded_tokens"], exp["padded_mask"]) - 0.25,
        atol=1e-5,
    )


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_live_export_loads_in_transformers(transformers, family, tmp_path):
    model, exp = loaded(family), expected(family)
    hf.export_hf(model.params, model.cfg, tmp_path, model_type=model.info.model_type, max_shard_size=40_000)
    tokens, mask = exp["padded_tokens"], exp["padded_mask"]
    assert max_diff(forward(model, tokens, mask), hf_logits(transformers, tmp_path, tokens, mask), mask) <= TOL


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_live_reward_model_export_scores_like_ours(transformers, family, tmp_path):
    rm, exp = reward_model(family), expected(family)
    hf.export_hf(rm.params, rm.cfg, tmp_path, reward_bias=0.25, token_ids={"pad_token_id": 0, "eos_token_id": 1})
    tokens, mask = exp["padded_tokens"], exp["padded_mask"]  # left- and right-padded rows, pad id 0
    theirs = hf_logits(transformers, tmp_path, tokens, mask, seq_cls=True)[:, 0]
    offset = json.loads((tmp_path / "config.json").read_text())[hf.REWARD_OFFSET_KEY]
    np.testing.assert_allclose(theirs + offset, rewards(rm, tokens, mask) - 0.25, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------ (d) sharded load


@pytest.mark.slow
def test_sharded_load_matches_one_device_and_reads_only_slices(monkeypatch):
    reads: list[tuple[str, tuple[int, ...]]] = []
    original_read = hf._Checkpoint.read

    def spy(self, name, slices):
        block = original_read(self, name, slices)
        reads.append((name, block.shape))
        return block

    monkeypatch.setattr(hf._Checkpoint, "read", spy)
    mesh, rules = sharding.make_mesh((1, 4, 2)), sharding.DEFAULT_RULES
    for family in LM_FAMILIES:
        single, exp = loaded(family), expected(family)  # (a one-device load: its reads are whole tensors)
        reads.clear()
        sharded = hf.load_hf(FIXTURES / family, mesh, rules, pad_vocab_to_multiple=2)
        q = sharded.params["layers_0"]["attn"]["q"]["kernel"]
        assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
        d = single.cfg.d_model
        # every read is one device's slice: embed dim split 4 ways (fsdp), heads/vocab/mlp 2 ways (tensor)
        embed_name = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
        embed_reads = [shape for name, shape in reads if name == embed_name]
        assert embed_reads and all(s[1] == d // 4 and s[0] <= -(-single.info.vocab_size // 2) for s in embed_reads)
        assert all(np.prod(s) <= sharded.cfg.vocab_size * d // 8 for s in embed_reads)  # 1/8 of the table
        tokens = np.concatenate([exp["padded_tokens"], exp["padded_tokens"][:1]])  # batch 4 (fsdp=4)
        mask = np.concatenate([exp["padded_mask"], exp["padded_mask"][:1]])
        with sharding.use(mesh, rules):
            batch = sharding.to_global((tokens, mask), mesh, rules)
            ours = np.asarray(_apply(sharded.cfg)(sharded.params, *batch))
        reference = forward(single, tokens, mask)
        vocab = single.info.vocab_size
        assert sharded.cfg.vocab_size % 2 == 0 and ours.shape[-1] == sharded.cfg.vocab_size
        np.testing.assert_allclose(ours[..., :vocab][mask == 1], reference[mask == 1], atol=1e-5, rtol=0)
        assert max_diff(ours[:3], exp["padded_logits"], exp["padded_mask"]) <= TOL
        np.testing.assert_array_equal(ours[..., vocab:], 0.0)  # padded ids: zero rows give logit 0


def test_scanned_layers_load_and_export(tmp_path):
    exp = expected("llama")
    scanned = hf.load_hf(FIXTURES / "llama", scan_layers=True)
    assert "layers" in scanned.params and scanned.params["layers"]["attn"]["q"]["kernel"].shape[0] == 2
    np.testing.assert_allclose(forward(scanned, exp["tokens"]), forward(loaded("llama"), exp["tokens"]), atol=1e-6)
    hf.export_hf(scanned.params, scanned.cfg, tmp_path)
    original, exported = hf_state(FIXTURES / "llama"), hf_state(tmp_path)
    assert sorted(original) == sorted(exported) and all(np.array_equal(exported[k], original[k]) for k in original)


def test_vocab_padding_options():
    llama = json.loads((FIXTURES / "llama" / "config.json").read_text())
    assert hf.config_from_hf(llama)[0].vocab_size == 125
    assert hf.config_from_hf(llama, pad_vocab_to_multiple=8)[0].vocab_size == 128
    assert hf.config_from_hf(llama, min_vocab_size=126)[0].vocab_size == 126  # room for an added PAD id
    assert hf.config_from_hf(llama, min_vocab_size=126, pad_vocab_to_multiple=4)[0].vocab_size == 128
    with pytest.raises(ValueError, match=r"vocab_size=126 must be in \(0, model.vocab_size=125\]"):
        hf.config_to_hf(loaded("llama").cfg, vocab_size=126)


def test_bfloat16_checkpoint_is_read(tmp_path):
    shutil.copytree(FIXTURES / "qwen2", tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}, tmp_path / "m" / "model.safetensors")
    model = hf.load_hf(tmp_path / "m")
    embed = np.asarray(model.params["embed"]["embedding"])
    want = state["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    assert embed.dtype == np.float32 and np.array_equal(embed, want)


# ------------------------------------------------------------------------------------------- workdirs


@pytest.mark.slow
def test_workdir_import_export_and_script(tmp_path):
    work = tmp_path / "work"
    config = hf.import_to_workdir(FIXTURES / "llama", work, mesh_shape=(1, 4, 2), pad_vocab_to_multiple=2)
    assert config["model"]["vocab_size"] == 126 and config["hf"]["vocab_size"] == 125
    stage = evaluate.load_stage(work)  # what sample.py and the evaluation use
    assert stage.tokenizer.eos_id == 1 and stage.model_cfg.vocab_size == 126
    shapes, shardings = sharding.model_shardings(Transformer(stage.model_cfg), stage.mesh, stage.rules)
    assert_same_params(checkpoint.load_params(work, shapes, shardings), stage.params)
    exp = expected("llama")
    assert max_diff(forward(hf.HFModel(stage.model_cfg, stage.params, None), exp["tokens"]), exp["logits"]) <= TOL
    # and back out through the script, which strips the padding and copies the tokenizer
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts/convert_hf.py"), "--to=hf", f"--workdir={work}", f"--hf_dir={out}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd + ["--mesh_shape=(1,1,1)"], check=True, capture_output=True, text=True, env=env)
    assert (out / "tokenizer.json").exists()
    original, exported = hf_state(FIXTURES / "llama"), hf_state(out)
    assert sorted(original) == sorted(exported) and all(np.array_equal(exported[k], original[k]) for k in original)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        hf.import_to_workdir(FIXTURES / "gpt2", work)


def test_reward_model_workdir_export_subtracts_the_stage_bias(tmp_path):
    hf.import_to_workdir(FIXTURES / "llama_rm", tmp_path / "rm", mesh_shape=(1, 1, 1))
    (tmp_path / "rm" / "reward_bias.json").write_text(json.dumps({"bias": 0.125}))  # as train_rm writes it
    out = hf.export_workdir(tmp_path / "rm", tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    assert config[hf.REWARD_OFFSET_KEY] == 0.375 - 0.125
    assert np.array_equal(hf_state(out)["score.weight"], hf_state(FIXTURES / "llama_rm")["score.weight"])


# ---------------------------------------------------------------------------------------- (e) errors


def copy_fixture(family: str, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(FIXTURES / family, tmp_path / family))


def edit_config(directory: pathlib.Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_tensor_names_the_file_and_tensor(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    state = load_file(d / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(
        KeyError, match=r"gpt2/model\.safetensors: tensor 'transformer\.h\.1\.mlp\.c_fc\.bias' is missing"
    ):
        hf.load_hf(d)
    d = copy_fixture("llama", tmp_path)  # sharded: the index is named
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"index\.json: tensor 'model\.layers\.1\.self_attn\.o_proj\.weight' is missing"):
        hf.load_hf(d)


def test_wrong_shape_and_unexpected_tensor_name_the_file_and_tensor(tmp_path):
    d = copy_fixture("mistral", tmp_path)
    edit_config(d, intermediate_size=80)
    with pytest.raises(
        ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"
    ):
        hf.load_hf(d)
    d = copy_fixture("qwen2", tmp_path)
    state = load_file(d / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)  # Qwen2 has no o bias
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\).*'model\.layers\.0\.self_attn\.o_proj\.bias'"):
        hf.load_hf(d)


def test_unsupported_configs_are_refused_naming_the_field(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    edit_config(d, model_type="bert")
    with pytest.raises(ValueError, match=r"config\.json: model_type='bert' is not supported"):
        hf.load_hf(d)
    llama = json.loads((FIXTURES / "llama" / "config.json").read_text())
    scaled = {**llama, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}
    with pytest.raises(ValueError, match="rope scaling type 'llama3' is not supported"):
        hf.config_from_hf(scaled)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        hf.config_from_hf({**llama, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="with 2 labels"):
        hf.config_from_hf({**llama, "architectures": ["LlamaForSequenceClassification"], "num_labels": 2})
    with pytest.raises(ValueError, match="attention_bias=True with mlp_bias=False"):
        hf.config_from_hf({**llama, "attention_bias": True})
    cfg, _ = hf.config_from_hf({**llama, "model_type": "mistral", "sliding_window": 16})
    assert cfg.max_len == 16  # a window shorter than the context: exact only up to the window
    with pytest.raises(ValueError, match="cannot be written as gpt2"):
        hf.config_to_hf(loaded("llama").cfg, "gpt2")


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copyfile(FIXTURES / "gpt2" / "config.json", d / "config.json")
    sentinel = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: only pickle checkpoints .* refusing to unpickle"):
        hf.load_hf(d)
    assert not sentinel.exists()


def test_corrupt_safetensors_header_names_the_file(tmp_path):
    d = copy_fixture("qwen2", tmp_path)
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[8:20] = b"{not json!!!"
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"qwen2/model\.safetensors: not a readable safetensors file"):
        hf.load_hf(d)


def test_sharded_index_faults_name_the_index_and_the_shard(tmp_path):
    d = copy_fixture("llama", tmp_path)
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = "model-00002-of-00003.safetensors"
    first = next(name for name, file in index["weight_map"].items() if file == shard)
    (d / shard).unlink()
    with pytest.raises(
        FileNotFoundError,
        match=rf"index\.json: shard {shard} does not exist \(it should hold tensor {first!r} and \d+ other",
    ):
        hf.load_hf(d)
    index_file.write_text('{"weight_map": {')
    with pytest.raises(ValueError, match=r"llama/model\.safetensors\.index\.json: not valid JSON"):
        hf.load_hf(d)
    for broken in ({"metadata": {}}, {"weight_map": list(index["weight_map"])}):
        index_file.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=r"llama/model\.safetensors\.index\.json: no 'weight_map' object"):
            hf.load_hf(d)


def test_mixed_float_dtypes_are_cast_with_a_warning_naming_them(tmp_path, caplog):
    d = copy_fixture("qwen2", tmp_path)
    state = load_file(d / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].astype(np.float16)  # one float16 among float32
    save_file(state, d / "model.safetensors")
    with caplog.at_level("WARNING", logger="instructjax.hf"):
        model = hf.load_hf(d)
    scale = np.asarray(model.params["final_norm"]["scale"])
    assert scale.dtype == np.float32 and np.array_equal(scale, state["model.norm.weight"].astype(np.float32))
    assert re.search(
        r"model\.safetensors: tensors have mixed dtypes \(F32: \d+ tensor.*; F16: 1 tensor\(s\) "
        r"\('model\.norm\.weight'\)\); all are cast to param_dtype=float32",
        caplog.text,
    )


@pytest.mark.parametrize("dtype", [np.int8, np.bool_])
def test_non_float_tensor_is_refused_naming_it(tmp_path, dtype):
    d = copy_fixture("gpt2", tmp_path)
    state = load_file(d / "model.safetensors")
    state["transformer.h.0.attn.c_proj.weight"] = state["transformer.h.0.attn.c_proj.weight"].astype(dtype)
    save_file(state, d / "model.safetensors")
    name = r"'transformer\.h\.0\.attn\.c_proj\.weight'"
    with pytest.raises(
        ValueError, match=rf"gpt2/model\.safetensors: tensor {name} has dtype (I8|BOOL), not a float dtype"
    ):
        hf.load_hf(d)


def test_tokenizer_larger_than_the_embedding_is_refused_as_the_wrong_tokenizer(tmp_path):
    d = copy_fixture("llama_rm", tmp_path)  # 64 embedding rows
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(FIXTURES / "gpt2" / name, d / name)  # 128 real tokens: another model's tokenizer
    wrong = (
        r"llama_rm/tokenizer\.json: tokenizer has 128 tokens but the embedding 'model\.embed_tokens\.weight' has "
        r"64 rows \(vocab_size in config\.json\): likely the wrong tokenizer .* min_vocab_size=128"
    )
    with pytest.raises(ValueError, match=wrong):
        hf.import_to_workdir(d, tmp_path / "work", mesh_shape=(1, 1, 1))
    assert not (tmp_path / "work" / "checkpoints").exists()
    with pytest.raises(ValueError, match=wrong):
        hf.load_hf(d, tokenizer=d)
    assert hf.load_hf(d, tokenizer=d, min_vocab_size=128).cfg.vocab_size == 128  # tokens added on purpose
    # a tokenizer without a PAD token gets one extra id: that one row is padding, not a fault
    d = copy_fixture("llama_rm", tmp_path / "added_pad")
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["vocab"]["<unused>"] = tok["model"]["vocab"].pop("<pad>")
    (d / "tokenizer.json").write_text(json.dumps(tok))
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    del tok_config["pad_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert load_tokenizer(d).pad_id == 64
    assert hf.load_hf(d, tokenizer=d).cfg.vocab_size == 65


def test_config_missing_field_or_invalid_json_names_the_file_and_field(tmp_path):
    d = copy_fixture("mistral", tmp_path)
    config = json.loads((d / "config.json").read_text())
    for field in ("hidden_size", "model_type"):
        (d / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != field}))
        with pytest.raises(ValueError, match=rf"mistral/config\.json: missing field '{field}'"):
            hf.load_hf(d)
    (d / "config.json").write_text(json.dumps(config)[:-5])
    with pytest.raises(ValueError, match=r"mistral/config\.json: not valid JSON"):
        hf.load_hf(d)
    (d / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"mistral/config\.json: not a JSON object"):
        hf.load_hf(d)

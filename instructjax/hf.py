"""Hugging Face interop: import and export safetensors checkpoints of the GPT-2 and Llama families.

Supported ``model_type``s: ``gpt2``, ``llama`` (Llama 2/3 without rope scaling), ``mistral`` and ``qwen2``
(q/k/v biases). ``docs/hf.md`` has the full name mapping and what is refused.

Import (``load_hf``) reads ``config.json`` into a ``ModelConfig`` and the ``*.safetensors`` files
(one file, or shards listed by ``model.safetensors.index.json``) straight onto the params' target
shardings: each parameter is built with ``jax.make_array_from_callback`` and each device's callback
reads only its own slice of the tensor (``safe_open(..., framework="numpy").get_slice``), so no full
copy of a sharded model ever sits on one device or host. Only safetensors are read: a pickle-only
checkpoint (``pytorch_model.bin``) is refused, never unpickled, because unpickling runs arbitrary code.

Every tensor is described by one ``_Map``: ours = ``hf.reshape(split)[pick].transpose(perm)``, possibly
zero-padded along the vocabulary. The same description drives both directions, so export (``export_hf``)
is the exact inverse of import and a round trip is bit-exact.

Vocabulary padding. Tensor parallelism shards the vocabulary over the ``tensor`` axis, which needs a
vocabulary divisible by it. ``pad_vocab_to_multiple`` appends zero rows to the embedding (and zero
columns to an untied lm head) on import; export strips them (``vocab_size``). ``min_vocab_size`` pads
too: our tokenizer adds a PAD id equal to the vocabulary size when a tokenizer has no pad token (GPT-2,
Llama 2), and the model needs a row for it. Padded ids get logit 0, not -inf: the tokenizer produces
none of them (PAD is masked), but a sampler could pick one when every real logit is negative.
Replicating the vocabulary instead (the rule ``("vocab", None)``) needs no padding for the mesh.

Reward models. Our reward model (``head='scalar'``: ``score_head`` kernel [D,1] and bias [1]) exports as
``<Family>ForSequenceClassification`` with one label: ``score.weight`` [1,D]. Transformers' score layer
has no bias, so the head's bias minus ``reward_bias`` (the normalisation constant the RM stage
subtracts from rewards) goes into ``config.json`` as ``instructjax_reward_offset``: transformers' logits
differ from our reward by that constant (rankings and pairwise losses are unaffected), and import puts
it back into the bias. Transformers reads the score at the last non-pad token of each row (it needs
``pad_token_id`` in ``config.json``); our reward is read at the EOS token, which is the last real token,
so the two agree when sequences end in EOS and padding uses ``pad_token_id``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import pathlib
import re
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from instructjax import sharding
from instructjax.model import ModelConfig, Transformer

log = logging.getLogger(__name__)

FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
REWARD_OFFSET_KEY = "instructjax_reward_offset"
CAUSAL_LM = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SEQ_CLS = {
    "gpt2": "GPT2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
}
_BASE_PREFIX = {"gpt2": "transformer.", "llama": "model.", "mistral": "model.", "qwen2": "model."}
_TIED_BY_DEFAULT = {"gpt2": True, "llama": False, "mistral": False, "qwen2": False}
# Non-parameter buffers some exporters write (GPT-2's causal mask, old Llama's rotary frequencies).
_BUFFERS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "*.bin", "*.pt", "*.pth", "*.ckpt")
# safetensors' numpy backend cannot build these; they are read through a memory map instead.
_ML_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_FLOAT_DTYPES = {"F16", "F32", "F64", *_ML_DTYPES}


# ---------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class HFModelInfo:
    """What ``config.json`` says beyond the architecture (kept so export can write it back)."""

    model_type: str
    architecture: str
    vocab_size: int  # rows in the checkpoint (ModelConfig.vocab_size may be padded beyond it)
    reward_offset: float | None = None  # REWARD_OFFSET_KEY of a sequence-classification checkpoint
    bos_token_id: Any = None
    eos_token_id: Any = None  # an int, or a list of ints (Llama 3 chat models)
    pad_token_id: Any = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _refuse(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: {what}")


def _required(hf: Mapping[str, Any], key: str, where: str) -> Any:
    if hf.get(key) is None:
        raise _refuse(where, f"missing field {key!r}")
    return hf[key]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def config_from_hf(
    hf: Mapping[str, Any],
    *,
    pad_vocab_to_multiple: int = 1,
    min_vocab_size: int = 0,
    scan_layers: bool = False,
    dtype: str = "float32",
    param_dtype: str = "float32",
    where: str = "config.json",
) -> tuple[ModelConfig, HFModelInfo]:
    """Our ``ModelConfig`` for a transformers ``config.json`` dict; anything the model cannot reproduce
    exactly (rope scaling, other activations, partial biases) is refused with the field named."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise _refuse(where, f"model_type={model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    arch = (hf.get("architectures") or [CAUSAL_LM[model_type]])[0]
    seq_cls = arch.endswith("ForSequenceClassification")
    if not (seq_cls or arch.endswith(("ForCausalLM", "LMHeadModel", "Model"))):
        raise _refuse(where, f"architecture {arch!r} is not supported (a causal LM or sequence classification)")
    if seq_cls:
        labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
        if labels != 1:
            raise _refuse(where, f"{arch} with {labels} labels: a reward model has exactly one (num_labels=1)")
    vocab = int(_required(hf, "vocab_size", where))
    if pad_vocab_to_multiple < 1:
        raise ValueError(f"pad_vocab_to_multiple={pad_vocab_to_multiple} must be >= 1")
    fields: dict[str, Any] = dict(
        vocab_size=_round_up(max(vocab, min_vocab_size), pad_vocab_to_multiple),
        head="scalar" if seq_cls else "lm",
        tie_embeddings=bool(hf.get("tie_word_embeddings", _TIED_BY_DEFAULT[model_type])),
        init_std=float(hf.get("initializer_range", 0.02)),
        dtype=dtype,
        param_dtype=param_dtype,
        scan_layers=scan_layers,
    )
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise _refuse(where, f"activation_function={act!r}: only the tanh GELU (gelu_new) is implemented")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if bool(hf.get(key, ok)) != ok:
                raise _refuse(where, f"{key}={hf[key]!r} is not supported (attention is scaled by 1/sqrt(head_dim))")
        if hf.get("add_cross_attention"):
            raise _refuse(where, "add_cross_attention=true is not supported (decoder-only model)")
        d = int(_required(hf, "n_embd", where))
        fields.update(
            d_model=d,
            n_layers=int(_required(hf, "n_layer", where)),
            n_heads=int(_required(hf, "n_head", where)),
            d_ff=int(hf.get("n_inner") or 4 * d),
            max_len=int(_required(hf, "n_positions", where)),
            positions="learned",
            norm="layernorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            mlp="gelu",
            use_bias=True,
        )
    else:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise _refuse(where, f"hidden_act={act!r}: only SwiGLU with silu is implemented")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in (None, "default"):
            raise _refuse(
                where,
                f"rope scaling type {rope_type!r} is not supported (only unscaled RoPE; Llama 3.1 uses 'llama3')",
            )
        partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        if partial != 1.0:
            raise _refuse(where, f"partial_rotary_factor={partial} is not supported")
        d, heads = int(_required(hf, "hidden_size", where)), int(_required(hf, "num_attention_heads", where))
        head_dim = int(hf.get("head_dim") or d // heads)
        if model_type == "qwen2":
            use_bias, qkv_bias = False, True
        else:
            attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
            if attn_bias != mlp_bias:
                raise _refuse(
                    where, f"attention_bias={attn_bias} with mlp_bias={mlp_bias}: only both or neither is supported"
                )
            use_bias, qkv_bias = attn_bias, False
        max_len = int(hf.get("max_position_embeddings") or 2048)
        window = hf.get("sliding_window")
        windowed = (
            model_type == "mistral"
            or hf.get("use_sliding_window")
            or "sliding_attention" in (hf.get("layer_types") or ())
        )
        if windowed and window and int(window) < max_len:
            log.warning(
                "%s: sliding_window=%s < max_position_embeddings=%s; our attention is full, so it matches "
                "transformers only up to %s tokens: max_len set to %s",
                where,
                window,
                max_len,
                window,
                window,
            )
            max_len = int(window)
        fields.update(
            d_model=d,
            n_layers=int(_required(hf, "num_hidden_layers", where)),
            n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=0 if head_dim * heads == d else head_dim,
            d_ff=int(_required(hf, "intermediate_size", where)),
            max_len=max_len,
            positions="rope",
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm="rmsnorm",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            mlp="swiglu",
            use_bias=use_bias,
            qkv_bias=qkv_bias,
        )
    offset = hf.get(REWARD_OFFSET_KEY)
    info = HFModelInfo(
        model_type=model_type,
        architecture=arch,
        vocab_size=vocab,
        reward_offset=None if offset is None else float(offset),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    return ModelConfig(**fields), info


def family_of(cfg: ModelConfig) -> str:
    """The transformers family that reproduces ``cfg`` exactly (an error naming the field when none does)."""
    if cfg.positions == "learned":
        wanted = dict(norm="layernorm", mlp="gelu", use_bias=True)
        bad = {k: getattr(cfg, k) for k, v in wanted.items() if getattr(cfg, k) != v}
        if bad or cfg.num_kv_heads != cfg.n_heads or cfg.dim_per_head * cfg.n_heads != cfg.d_model:
            raise ValueError(
                f"learned positions export as gpt2, which needs layernorm, gelu, use_bias=True, no GQA and "
                f"head_dim = d_model / n_heads; this config has {bad or 'GQA or another head_dim'}"
            )
        return "gpt2"
    bad = {k: getattr(cfg, k) for k, v in dict(norm="rmsnorm", mlp="swiglu").items() if getattr(cfg, k) != v}
    if bad:
        raise ValueError(f"rope models export as llama/mistral/qwen2, which need rmsnorm and swiglu; got {bad}")
    return "qwen2" if cfg.qkv_bias and not cfg.use_bias else "llama"


def config_to_hf(
    cfg: ModelConfig,
    model_type: str | None = None,
    *,
    vocab_size: int | None = None,
    reward_offset: float = 0.0,
    token_ids: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The transformers ``config.json`` for ``cfg`` (a sequence-classification layout for a scalar head)."""
    model_type = model_type or family_of(cfg)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    natural = family_of(cfg)
    compatible = natural == model_type or (natural == "llama" and model_type == "mistral" and not cfg.use_bias)
    if not compatible:
        raise ValueError(f"this model config is a {natural} architecture and cannot be written as {model_type}")
    vocab = cfg.vocab_size if vocab_size is None else vocab_size
    if not 0 < vocab <= cfg.vocab_size:
        raise ValueError(f"vocab_size={vocab} must be in (0, model.vocab_size={cfg.vocab_size}]")
    scalar = cfg.head == "scalar"
    out: dict[str, Any] = {
        "architectures": [SEQ_CLS[model_type] if scalar else CAUSAL_LM[model_type]],
        "model_type": model_type,
        "vocab_size": vocab,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "dtype": dtype,
    }
    if model_type == "gpt2":
        out.update(
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            n_positions=cfg.max_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new",
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            resid_pdrop=cfg.dropout_rate,
            embd_pdrop=cfg.dropout_rate,
            attn_pdrop=cfg.attention_dropout_rate,
        )
    else:
        out.update(
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.dim_per_head,
            max_position_embeddings=cfg.max_len,
            rms_norm_eps=cfg.norm_eps,
            hidden_act="silu",
            # both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta/rope_scaling
            rope_theta=cfg.rope_theta,
            rope_scaling=None,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            attention_dropout=cfg.attention_dropout_rate,
        )
        if model_type == "qwen2":
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        else:
            out.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
            if model_type == "mistral":
                out["sliding_window"] = None
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        out[key] = (token_ids or {}).get(key)
    if scalar:
        out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, num_labels=1)
        out[REWARD_OFFSET_KEY] = float(reward_offset)
    return out


# --------------------------------------------------------------------------------------------- mapping


@dataclasses.dataclass(frozen=True)
class _Map:
    """One HF tensor -> one of our arrays: ``hf.reshape(split dims)``, fix the ``pick``ed split dims,
    then ``transpose(perm)`` of the remaining ones. ``split`` lists each HF dim's factors; ``pick`` has
    one entry per factor (an index or None); ``perm[j]`` is the kept factor that becomes our dim j."""

    name: str
    split: tuple[tuple[int, ...], ...]
    pick: tuple[int | None, ...]
    perm: tuple[int, ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(f) for f in self.split)

    @property
    def shape(self) -> tuple[int, ...]:
        """Our shape before any vocabulary padding."""
        kept = [n for n, p in zip(self._factors, self.pick, strict=True) if p is None]
        return tuple(kept[k] for k in self.perm)

    @property
    def _factors(self) -> tuple[int, ...]:
        return tuple(n for f in self.split for n in f)

    def read(self, ckpt: _Checkpoint, index: tuple[slice, ...], dtype: Any) -> np.ndarray:
        """Our array's block ``index`` (slices of our possibly padded shape), reading only what it needs."""
        out = np.zeros(tuple(s.stop - s.start for s in index), dtype)
        clipped = [slice(s.start, min(s.stop, n)) for s, n in zip(index, self.shape, strict=True)]
        if any(c.stop <= c.start for c in clipped):
            return out  # entirely in the vocabulary padding
        kept_ranges: list[slice] = [slice(0)] * len(self.perm)
        for j, c in enumerate(clipped):
            kept_ranges[self.perm[j]] = c
        ranges, k = [], 0
        for p in self.pick:
            if p is None:
                ranges.append(kept_ranges[k])
                k += 1
            else:
                ranges.append(slice(p, p + 1))
        # Per HF dim: leading factors fixed to one index give an offset; the first wider factor is read
        # as one contiguous range; the factors after it are sliced after the read.
        hf_slices, block_shape, post, r = [], [], [], 0
        for factors in self.split:
            rs = ranges[r : r + len(factors)]
            r += len(factors)
            strides = [math.prod(factors[i + 1 :]) for i in range(len(factors))]
            lead, offset = 0, 0
            while lead < len(factors) - 1 and rs[lead].stop - rs[lead].start == 1:
                offset += rs[lead].start * strides[lead]
                lead += 1
            start = offset + rs[lead].start * strides[lead]
            hf_slices.append(slice(start, start + (rs[lead].stop - rs[lead].start) * strides[lead]))
            block_shape += [1] * lead + [rs[lead].stop - rs[lead].start, *factors[lead + 1 :]]
            post += [slice(None)] * (lead + 1) + list(rs[lead + 1 :])
        block = ckpt.read(self.name, tuple(hf_slices)).reshape(block_shape)[tuple(post)]
        block = block[tuple(0 if p is not None else slice(None) for p in self.pick)].transpose(self.perm)
        out[tuple(slice(0, c.stop - c.start) for c in clipped)] = block
        return out


class _Entry(NamedTuple):
    """Where one of our arrays (or one layer of a stacked array) comes from: a tensor, or a constant."""

    path: str
    layer: int | None
    source: _Map | np.ndarray


def _linear(name: str, hf_dims: Sequence[Sequence[int]], perm: Sequence[int]) -> _Map:
    split = tuple(tuple(d) for d in hf_dims)
    return _Map(name, split, (None,) * sum(len(d) for d in split), tuple(perm))


def _layer_maps(cfg: ModelConfig, family: str, pre: str) -> dict[str, _Map]:
    """Our names inside one block -> HF tensors (``pre`` is the HF prefix of the block)."""
    d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.d_ff
    maps: dict[str, _Map] = {}
    if family == "gpt2":  # Conv1D weights are [in, out]: no transpose
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            maps[f"{ours}/scale"] = _linear(f"{pre}{theirs}.weight", [[d]], [0])
            maps[f"{ours}/bias"] = _linear(f"{pre}{theirs}.bias", [[d]], [0])
        for i, proj in enumerate("qkv"):  # fused c_attn: columns [q | k | v], each [N, H]
            c_attn = ((d,), (3, n, h))
            maps[f"attn/{proj}/kernel"] = _Map(f"{pre}attn.c_attn.weight", c_attn, (None, i, None, None), (0, 1, 2))
            maps[f"attn/{proj}/bias"] = _Map(f"{pre}attn.c_attn.bias", ((3, n, h),), (i, None, None), (0, 1))
        maps["attn/o/kernel"] = _linear(f"{pre}attn.c_proj.weight", [[n, h], [d]], [0, 1, 2])
        maps["attn/o/bias"] = _linear(f"{pre}attn.c_proj.bias", [[d]], [0])
        maps["mlp/wi/kernel"] = _linear(f"{pre}mlp.c_fc.weight", [[d], [f]], [0, 1])
        maps["mlp/wi/bias"] = _linear(f"{pre}mlp.c_fc.bias", [[f]], [0])
        maps["mlp/wo/kernel"] = _linear(f"{pre}mlp.c_proj.weight", [[f], [d]], [0, 1])
        maps["mlp/wo/bias"] = _linear(f"{pre}mlp.c_proj.bias", [[d]], [0])
        return maps
    # Llama family: nn.Linear weights are [out, in]
    maps["attn_norm/scale"] = _linear(f"{pre}input_layernorm.weight", [[d]], [0])
    maps["mlp_norm/scale"] = _linear(f"{pre}post_attention_layernorm.weight", [[d]], [0])
    for proj, heads in (("q", n), ("k", k), ("v", k)):
        maps[f"attn/{proj}/kernel"] = _linear(f"{pre}self_attn.{proj}_proj.weight", [[heads, h], [d]], [2, 0, 1])
        if cfg.use_bias or cfg.qkv_bias:
            maps[f"attn/{proj}/bias"] = _linear(f"{pre}self_attn.{proj}_proj.bias", [[heads, h]], [0, 1])
    maps["attn/o/kernel"] = _linear(f"{pre}self_attn.o_proj.weight", [[d], [n, h]], [1, 2, 0])
    for ours, theirs in (("wi_gate", "gate_proj"), ("wi_up", "up_proj")):
        maps[f"mlp/{ours}/kernel"] = _linear(f"{pre}mlp.{theirs}.weight", [[f], [d]], [1, 0])
    maps["mlp/wo/kernel"] = _linear(f"{pre}mlp.down_proj.weight", [[d], [f]], [1, 0])
    if cfg.use_bias:
        maps["attn/o/bias"] = _linear(f"{pre}self_attn.o_proj.bias", [[d]], [0])
        for ours, theirs, size in (("wi_gate", "gate_proj", f), ("wi_up", "up_proj", f), ("wo", "down_proj", d)):
            maps[f"mlp/{ours}/bias"] = _linear(f"{pre}mlp.{theirs}.bias", [[size]], [0])
    return maps


def _entries(cfg: ModelConfig, family: str, prefix: str, vocab: int, reward_offset: float) -> list[_Entry]:
    """Every one of our arrays and its source, for ``cfg`` read from / written to HF ``family``."""
    d = cfg.d_model
    gpt2 = family == "gpt2"
    embed = f"{prefix}wte.weight" if gpt2 else f"{prefix}embed_tokens.weight"
    entries = [_Entry("embed/embedding", None, _linear(embed, [[vocab], [d]], [0, 1]))]
    if gpt2:
        entries.append(
            _Entry("pos_embed/embedding", None, _linear(f"{prefix}wpe.weight", [[cfg.max_len], [d]], [0, 1]))
        )
    block = "h" if gpt2 else "layers"
    for i in range(cfg.n_layers):
        for ours, m in _layer_maps(cfg, family, f"{prefix}{block}.{i}.").items():
            entries.append(_Entry(f"layers/{ours}", i, m) if cfg.scan_layers else _Entry(f"layers_{i}/{ours}", None, m))
    final = f"{prefix}ln_f" if gpt2 else f"{prefix}norm"
    entries.append(_Entry("final_norm/scale", None, _linear(f"{final}.weight", [[d]], [0])))
    if gpt2:
        entries.append(_Entry("final_norm/bias", None, _linear(f"{final}.bias", [[d]], [0])))
    if cfg.head == "scalar":
        entries.append(_Entry("score_head/kernel", None, _linear("score.weight", [[1], [d]], [1, 0])))
        entries.append(_Entry("score_head/bias", None, np.array([reward_offset], np.float64)))
    elif not cfg.tie_embeddings:
        entries.append(_Entry("lm_head/kernel", None, _linear("lm_head.weight", [[vocab], [d]], [1, 0])))
    return entries


# ------------------------------------------------------------------------------------------ checkpoint


def _safetensors_header(path: pathlib.Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return {"__size__": size, **json.loads(f.read(size))}


class _Checkpoint:
    """The safetensors files of a HF model directory, opened lazily; errors name the file and tensor."""

    def __init__(self, directory: str | pathlib.Path):
        self.dir = pathlib.Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: not a directory")
        config_file = self.dir / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file}: missing (a Hugging Face model directory has one)")
        try:
            self.config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from e
        index_file = self.dir / "model.safetensors.index.json"
        self._stack = contextlib.ExitStack()
        self._handles: dict[pathlib.Path, Any] = {}
        self._headers: dict[pathlib.Path, dict] = {}
        self.weight_map: dict[str, pathlib.Path] = {}
        if index_file.exists():
            self.index = index_file
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index_file}: not a safetensors index ({e!r})") from e
            for name, file in weight_map.items():
                path = self.dir / file
                if not path.exists():
                    raise FileNotFoundError(f"{index_file}: tensor {name!r} is in {file}, which does not exist")
                self.weight_map[name] = path
            return
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            pickles = sorted({p.name for pattern in _PICKLES for p in self.dir.glob(pattern)})
            if pickles:
                raise ValueError(
                    f"{self.dir / pickles[0]}: only pickle checkpoints ({', '.join(pickles)}) found; refusing to "
                    "unpickle (it can run arbitrary code). Convert them to safetensors first"
                )
            raise FileNotFoundError(f"{self.dir}: no *.safetensors file and no model.safetensors.index.json")
        self.index = files[0] if len(files) == 1 else self.dir
        try:
            for path in files:
                for name in self._handle(path).keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name in self.weight_map:
                        raise ValueError(f"{path}: tensor {name!r} is also in {self.weight_map[name].name}")
                    self.weight_map[name] = path
        except Exception:
            self.close()
            raise

    def _handle(self, path: pathlib.Path) -> Any:
        if path not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="numpy"))
            except Exception as e:  # noqa: BLE001 (safetensors raises its own error type)
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        return self._handles[path]

    def where(self, name: str) -> str:
        path = self.weight_map.get(name)
        return str(path if path is not None else self.index)

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """``(shape, safetensors dtype)`` of a tensor; a missing tensor is an error naming the file."""
        if name not in self.weight_map:
            raise KeyError(f"{self.index}: tensor {name!r} is missing")
        try:
            sl = self._handle(self.weight_map[name]).get_slice(name)
        except Exception as e:  # noqa: BLE001
            raise KeyError(f"{self.weight_map[name]}: tensor {name!r} is listed but cannot be read ({e})") from e
        return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
        """A block of a tensor; only the bytes of ``slices`` are read."""
        path = self.weight_map[name]
        shape, dtype = self.meta(name)
        if dtype in _ML_DTYPES:  # numpy cannot name bfloat16: map the bytes with ml_dtypes
            if path not in self._headers:
                self._headers[path] = _safetensors_header(path)
            header = self._headers[path]
            begin = 8 + header["__size__"] + header[name]["data_offsets"][0]
            mapped = np.memmap(path, dtype=_ML_DTYPES[dtype], mode="r", offset=begin, shape=shape)
            return np.array(mapped[slices])
        return self._handle(path).get_slice(name)[slices]

    def close(self) -> None:
        self._stack.close()


def _check(ckpt: _Checkpoint, entries: Sequence[_Entry], cfg: ModelConfig) -> None:
    """Every tensor the model needs exists with the right shape and a float dtype; nothing is left over."""
    used = set()
    for e in entries:
        if not isinstance(e.source, _Map):
            continue
        used.add(e.source.name)
        shape, dtype = ckpt.meta(e.source.name)
        if shape != e.source.hf_shape:
            raise ValueError(
                f"{ckpt.where(e.source.name)}: tensor {e.source.name!r} has shape {shape}, expected "
                f"{e.source.hf_shape} from config.json (for our {e.path})"
            )
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{ckpt.where(e.source.name)}: tensor {e.source.name!r} has dtype {dtype}, not a float")
    ignored = {"lm_head.weight"} if cfg.tie_embeddings and cfg.head == "lm" else set()
    extra = sorted(n for n in ckpt.weight_map if n not in used and n not in ignored and not _BUFFERS.search(n))
    if extra:
        shown = ", ".join(f"{n!r} ({ckpt.weight_map[n].name})" for n in extra[:5])
        raise ValueError(
            f"{ckpt.index}: {len(extra)} unexpected tensor(s) the model has no place for: {shown}"
            f"{' ...' if len(extra) > 5 else ''} (config.json and the weights disagree?)"
        )


def _prefix(names: Any, family: str) -> str:
    base = _BASE_PREFIX[family]
    embed = "wte.weight" if family == "gpt2" else "embed_tokens.weight"
    return base if f"{base}{embed}" in names else ""


# ------------------------------------------------------------------------------------------------ import


class HFModel(NamedTuple):
    """What ``load_hf`` returns."""

    cfg: ModelConfig
    params: Any  # plain pytree of jax arrays on the target shardings
    info: HFModelInfo


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _normalise(index: Any, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def _tqdm(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor", dynamic_ncols=True)


def load_hf(
    directory: str | pathlib.Path,
    mesh: Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    *,
    pad_vocab_to_multiple: int = 1,
    min_vocab_size: int = 0,
    scan_layers: bool = False,
    dtype: str = "float32",
    param_dtype: str = "float32",
    progress: bool = False,
) -> HFModel:
    """A HF model directory as ``(ModelConfig, params, HFModelInfo)``, params placed on ``mesh``
    (default: one device) by ``rules``; each device reads only its slice of each tensor.

    ``pad_vocab_to_multiple``: round the vocabulary up (zero rows) so it divides the mesh's tensor axis;
    ``min_vocab_size``: at least this many rows (a tokenizer's ``vocab_size`` when it adds a PAD id).
    ``param_dtype`` is the storage dtype (tensors are cast); ``dtype`` the compute dtype of the config.
    """
    if mesh is None:
        mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    ckpt = _Checkpoint(directory)
    try:
        cfg, info = config_from_hf(
            ckpt.config,
            pad_vocab_to_multiple=pad_vocab_to_multiple,
            min_vocab_size=min_vocab_size,
            scan_layers=scan_layers,
            dtype=dtype,
            param_dtype=param_dtype,
            where=str(ckpt.dir / "config.json"),
        )
        prefix = _prefix(ckpt.weight_map, info.model_type)
        entries = _entries(cfg, info.model_type, prefix, info.vocab_size, info.reward_offset or 0.0)
        _check(ckpt, entries, cfg)
        shapes, shardings = sharding.model_shardings(Transformer(cfg), mesh, rules)
        by_path: dict[str, list[_Entry]] = {}
        for e in entries:
            by_path.setdefault(e.path, []).append(e)
        flat_shapes = {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
        if set(flat_shapes) != set(by_path):
            raise AssertionError(f"hf mapping out of date: {sorted(set(flat_shapes) ^ set(by_path))}")

        def build(path_str: str, shaped: jax.ShapeDtypeStruct, sh: jax.sharding.Sharding) -> jax.Array:
            group = by_path[path_str]

            def one(source: _Map | np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
                if isinstance(source, np.ndarray):
                    return source[index].astype(shaped.dtype)
                return source.read(ckpt, index, shaped.dtype)

            def callback(index: Any) -> np.ndarray:
                index = _normalise(index, shaped.shape)
                if group[0].layer is None:
                    return one(group[0].source, index)
                rows = [one(group[layer].source, index[1:]) for layer in range(index[0].start, index[0].stop)]
                return np.stack(rows)

            return jax.make_array_from_callback(shaped.shape, sh, callback)

        leaves = []
        paths = [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes)]
        shards = jax.tree.leaves(shardings)
        todo = zip(paths, jax.tree.leaves(shapes), shards, strict=True)
        for path_str, shaped, sh in _tqdm(todo, len(paths), "import", progress):
            leaves.append(build(path_str, shaped, sh))
        params = jax.tree.unflatten(jax.tree.structure(shapes), leaves)
    finally:
        ckpt.close()
    return HFModel(cfg, params, info)


# ------------------------------------------------------------------------------------------------ export


def _to_host(x: Any) -> np.ndarray:
    """The full value of a (possibly sharded, possibly multi-host) array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _leaf(params: Any, path: str) -> Any:
    node = params
    for key in path.split("/"):
        if key not in node:
            raise KeyError(f"params have no {path} (the model config and the params disagree)")
        node = node[key]
    return node


def _np_dtype(name: str) -> Any:
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def hf_tensors(
    params: Any, cfg: ModelConfig, model_type: str | None = None, *, vocab_size: int | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """``(HF name, array)`` for every tensor of the export of ``params``, one at a time (gathered to host)."""
    family = model_type or family_of(cfg)
    vocab = cfg.vocab_size if vocab_size is None else vocab_size
    entries = _entries(cfg, family, _BASE_PREFIX[family], vocab, 0.0)
    groups: dict[str, list[_Entry]] = {}
    for e in entries:
        if isinstance(e.source, _Map):
            groups.setdefault(e.source.name, []).append(e)
    for name, group in groups.items():
        m0 = group[0].source
        full = None
        for e in group:
            x = _leaf(params, e.path)
            x = _to_host(x if e.layer is None else x[e.layer])
            x = x[tuple(slice(0, n) for n in e.source.shape)]  # drop vocabulary padding
            kept = x.transpose(np.argsort(e.source.perm))
            if full is None:
                full = np.zeros(tuple(n for f in m0.split for n in f), x.dtype)
            full[tuple(p if p is not None else slice(None) for p in e.source.pick)] = kept
        yield name, full.reshape(m0.hf_shape)


def _shard_plan(names_sizes: Sequence[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in names_sizes:
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def copy_tokenizer(source: str | pathlib.Path, out_dir: str | pathlib.Path) -> list[str]:
    """Copy the tokenizer files of ``source`` (a directory, or a tokenizer file) into ``out_dir``."""
    source, out_dir = pathlib.Path(source), pathlib.Path(out_dir)
    if source.is_file():
        files = [source] + [source.parent / n for n in TOKENIZER_FILES if n != source.name]
    else:
        files = [source / n for n in TOKENIZER_FILES]
    copied = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        if f.is_file():
            shutil.copyfile(f, out_dir / f.name)
            copied.append(f.name)
    return copied


def export_hf(
    params: Any,
    cfg: ModelConfig,
    out_dir: str | pathlib.Path,
    *,
    model_type: str | None = None,
    vocab_size: int | None = None,
    reward_bias: float = 0.0,
    token_ids: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    max_shard_size: int = 4 << 30,
    tokenizer: str | pathlib.Path | None = None,
    progress: bool = False,
) -> pathlib.Path:
    """Write ``params`` as a transformers model directory (``config.json`` + safetensors, sharded with an
    index above ``max_shard_size`` bytes) that ``AutoModelForCausalLM`` loads, or, for a scalar head,
    ``AutoModelForSequenceClassification`` (one label; see the module docstring for the reward offset).

    ``model_type``: the family to write (default: the one ``cfg`` is; a llama-shaped config can also be
    written as mistral). ``vocab_size``: rows to keep (drops import padding). ``reward_bias`` is
    subtracted from the reward: ``instructjax_reward_offset = score_head bias - reward_bias``.
    ``token_ids``: ``bos_token_id``/``eos_token_id``/``pad_token_id`` for ``config.json`` (a reward
    model needs ``pad_token_id``). ``tokenizer``: a tokenizer file or directory to copy alongside.
    Only process 0 writes; every process must call it (gathering a sharded array is collective).
    """
    from safetensors.numpy import save_file

    out_dir = pathlib.Path(out_dir)
    family = model_type or family_of(cfg)
    offset = 0.0
    if cfg.head == "scalar":
        offset = float(_to_host(params["score_head"]["bias"])[0]) - float(reward_bias)
        if (token_ids or {}).get("pad_token_id") is None:
            log.warning("reward model exported without pad_token_id: transformers then scores batches of one only")
    hf_config = config_to_hf(cfg, family, vocab_size=vocab_size, reward_offset=offset, token_ids=token_ids, dtype=dtype)
    np_dtype = _np_dtype(dtype)
    entries = _entries(cfg, family, _BASE_PREFIX[family], hf_config["vocab_size"], 0.0)
    sizes: dict[str, int] = {}
    for e in entries:
        if isinstance(e.source, _Map):
            sizes[e.source.name] = math.prod(e.source.hf_shape) * np.dtype(np_dtype).itemsize
    shards = _shard_plan(list(sizes.items()), max_shard_size)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tensors = hf_tensors(params, cfg, family, vocab_size=hf_config["vocab_size"])
    bar = _tqdm(tensors, len(sizes), "export", progress and writer)
    weight_map, shard_i, pending = {}, 0, {}
    for name, array in bar:
        pending[name] = np.ascontiguousarray(array.astype(np_dtype))
        if len(pending) == len(shards[shard_i]):
            if writer:
                save_file(pending, str(out_dir / files[shard_i]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(pending, files[shard_i]))
            shard_i, pending = shard_i + 1, {}
    if writer and len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if writer and tokenizer is not None:
        copy_tokenizer(tokenizer, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------ stage workdirs


def _mesh(shape: Sequence[int]) -> Mesh:
    """A mesh of ``shape``; a shape without -1 that needs fewer devices than there are uses the first ones
    (converting a small model on a big host should not fail for want of a fill axis)."""
    shape = tuple(int(s) for s in shape)
    devices = jax.devices()
    if -1 not in shape and math.prod(shape) < len(devices):
        devices = devices[: math.prod(shape)]
    return sharding.make_mesh(shape, devices=devices)


def import_to_workdir(
    hf_dir: str | pathlib.Path,
    workdir: str | pathlib.Path,
    *,
    mesh_shape: Sequence[int] = (1, -1, 1),
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    pad_vocab_to_multiple: int = 1,
    min_vocab_size: int | None = None,
    scan_layers: bool = False,
    dtype: str = "float32",
    param_dtype: str = "float32",
    progress: bool = False,
) -> dict[str, Any]:
    """A HF model as a stage workdir: ``config.json`` (model, mesh, rules, tokenizer, the HF facts) and
    ``checkpoints/0/params`` (orbax), which ``checkpoint.load_params`` (``init_from``) and
    ``evaluate.load_stage`` read. The tokenizer files are copied to ``workdir/tokenizer``.

    ``min_vocab_size=None`` means the tokenizer's ``vocab_size`` when ``load_tokenizer`` reads it, so an
    added PAD id has its embedding row (the training stages require model vocab >= tokenizer vocab)."""
    import orbax.checkpoint as ocp

    from instructjax.tokenizer import load_tokenizer

    hf_dir, workdir = pathlib.Path(hf_dir).absolute(), pathlib.Path(workdir).absolute()
    if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
        raise FileExistsError(f"{workdir / 'checkpoints'} already holds checkpoints: convert into an empty workdir")
    if min_vocab_size is None:
        min_vocab_size = 0
        try:
            min_vocab_size = load_tokenizer(hf_dir).vocab_size
        except (ValueError, FileNotFoundError) as e:
            log.warning("%s: tokenizer not usable by instructjax (%s); vocabulary not padded for it", hf_dir, e)
    mesh = _mesh(mesh_shape)
    cfg, params, info = load_hf(
        hf_dir,
        mesh,
        rules,
        pad_vocab_to_multiple=pad_vocab_to_multiple,
        min_vocab_size=min_vocab_size,
        scan_layers=scan_layers,
        dtype=dtype,
        param_dtype=param_dtype,
        progress=progress,
    )
    tokenizer = ""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        if copy_tokenizer(hf_dir, workdir / "tokenizer"):
            tokenizer = str(workdir / "tokenizer")
    config = {
        "stage": "hf_import",
        "model": dataclasses.asdict(cfg),
        "mesh_shape": list(mesh_shape),
        "rules": [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in rules],
        "seed": 0,
        "init_from": "",
        "data": {"world_dir": "", "tokenizer": tokenizer, "prompt_template": "{prompt}"},
        "hf": {"source": str(hf_dir), **info.to_dict()},
    }
    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True)
    with ocp.CheckpointManager(workdir / "checkpoints", options=options) as manager:
        manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        manager.wait_until_finished()
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return config


def export_workdir(
    workdir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    best: bool = False,
    step: int | None = None,
    reward_bias: float | None = None,
    model_type: str | None = None,
    dtype: str = "float32",
    max_shard_size: int = 4 << 30,
    mesh_shape: Sequence[int] | None = None,
    progress: bool = False,
) -> pathlib.Path:
    """Export a stage workdir's params (latest step, ``step``, or ``best``) as a transformers directory,
    with its tokenizer. An imported workdir's ``hf`` section supplies the original family, vocabulary
    size and special-token ids; ids it lacks come from the tokenizer (whose added PAD id, if any, keeps
    its vocabulary row). ``reward_bias=None``: a reward model's ``reward_bias.json`` (written by the RM
    stage for its best checkpoint: export that one with ``best=True``), or 0 without one."""
    from instructjax import checkpoint
    from instructjax.tokenizer import load_tokenizer

    workdir = pathlib.Path(workdir)
    config = json.loads((workdir / "config.json").read_text())
    cfg = ModelConfig.from_dict(config["model"])
    mesh = _mesh(mesh_shape or config.get("mesh_shape", (1, -1, 1)))
    rules = sharding.as_rules(config.get("rules", sharding.DEFAULT_RULES))
    shapes, shardings = sharding.model_shardings(Transformer(cfg), mesh, rules)
    params = checkpoint.load_params(workdir, shapes, shardings, step=step, best=best)
    if reward_bias is None:
        bias_file = workdir / "reward_bias.json"
        reward_bias = float(json.loads(bias_file.read_text())["bias"]) if bias_file.exists() else 0.0
        if cfg.head == "scalar":
            log.warning("reward model: subtracting reward_bias=%s (%s)", reward_bias, bias_file)
    hf = config.get("hf") or {}
    token_ids = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    data = config.get("data") or {}
    tokenizer = data.get("tokenizer") or None
    if not tokenizer and data.get("world_dir"):
        tokenizer = str(pathlib.Path(data["world_dir"]) / "tokenizer.json")
    if tokenizer and pathlib.Path(tokenizer).exists():
        tok = load_tokenizer(tokenizer)
        from_tokenizer = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        token_ids = {k: from_tokenizer[k] if v is None else v for k, v in token_ids.items()}
    else:
        tokenizer = None
    vocab = hf.get("vocab_size") or cfg.vocab_size
    ids = [i for v in token_ids.values() for i in (v if isinstance(v, list) else [v]) if i is not None]
    if ids and max(ids) >= vocab:  # an added PAD id in the padding rows: keep its row
        log.warning("keeping %d vocabulary rows (not %d) so token id %d exists", max(ids) + 1, vocab, max(ids))
        vocab = min(max(ids) + 1, cfg.vocab_size)
    return export_hf(
        params,
        cfg,
        out_dir,
        model_type=model_type or hf.get("model_type"),
        vocab_size=vocab,
        reward_bias=reward_bias,
        token_ids=token_ids,
        dtype=dtype,
        max_shard_size=max_shard_size,
        tokenizer=tokenizer,
        progress=progress,
    )

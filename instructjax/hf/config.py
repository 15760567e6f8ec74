"""Hugging Face ``config.json`` <-> our ``ModelConfig``, both directions.

``config_from_hf`` reads a transformers config of a supported ``model_type`` (``FAMILIES``: ``gpt2``;
``llama``, Llama 2/3 without rope scaling; ``mistral``; ``qwen2`` with q/k/v biases) and refuses, naming
the field, anything our ``Transformer`` cannot reproduce exactly (rope scaling, other activations,
partial biases, classification heads with more than one label). ``family_of`` / ``config_to_hf`` go
back: the family that reproduces a ``ModelConfig`` and its ``config.json``. ``docs/hf.md`` lists the
fields and what is refused.

Vocabulary padding (``pad_vocab_to_multiple``, ``min_vocab_size``) rounds ``ModelConfig.vocab_size`` up;
``HFModelInfo.vocab_size`` keeps the checkpoint's row count so export can strip the padding. A reward
model's bias offset travels in ``config.json`` as ``REWARD_OFFSET_KEY`` (see the ``instructjax.hf``
package docstring).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from instructjax.model import ModelConfig

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
    model_type = _required(hf, "model_type", where)
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

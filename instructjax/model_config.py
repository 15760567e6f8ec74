"""The model's architecture and numerics: ``ModelConfig`` (validated on construction; ``configs/model.py``
documents every field and holds the presets) and the activation-checkpointing policies ``remat`` names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block on the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics. ``configs/model.py`` documents every field and holds the presets."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    n_kv_heads: int = 0  # 0 means n_heads (no grouped-query attention)
    head_dim: int = 0  # 0 means d_model // n_heads
    max_len: int = 1024
    positions: str = "learned"  # 'learned' (GPT-2) or 'rope' (Llama)
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # 'layernorm' (GPT-2) or 'rmsnorm' (Llama)
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # 'gelu' (GPT-2, tanh approximation) or 'swiglu' (Llama)
    use_bias: bool = True  # biases on every dense layer and norm (GPT-2)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2); implied by use_bias
    tie_embeddings: bool = True  # lm head = token embedding transposed (GPT-2)
    head: str = "lm"  # 'lm' -> logits [B,T,V]; 'scalar' -> one value per token [B,T]
    dropout_rate: float = 0.0  # embedding and residual dropout (the paper's SFT uses 0.2)
    attention_dropout_rate: float = 0.0
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # 'none', 'full' or 'dots'
    scan_layers: bool = False

    def __post_init__(self):
        choices = {
            "positions": ("learned", "rope"),
            "norm": ("layernorm", "rmsnorm"),
            "mlp": ("gelu", "swiglu"),
            "head": ("lm", "scalar"),
            "remat": ("none", *REMAT_POLICIES),
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"model.{field}={getattr(self, field)!r}: expected one of {allowed}")
        if self.d_model % self.n_heads and not self.head_dim:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.num_kv_heads <= 0 or self.n_heads % self.num_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.num_kv_heads}")
        if self.positions == "rope" and self.dim_per_head % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.dim_per_head}")

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        """From a ``ConfigDict`` or dict; unknown keys are an error naming the key."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        return cls(**d)

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

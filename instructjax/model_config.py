"""The model's architecture and numerics: ``ModelConfig`` (validated on construction; ``configs/model.py``
documents every field and holds the presets), the activation-checkpointing policies ``remat`` names, and
which attention implementation a call takes (``ModelConfig.attention_path``, docs/gpu.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block on the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}

# The attention mask of one model call, as ``Transformer.__call__`` classifies it from its arguments. Only the
# first two are causal + per-row key lengths, the one mask family cuDNN's fused kernel takes; the others say
# why not.
MASK_KINDS = {
    "causal": None,  # no mask_bt: every token real
    "prefix": None,  # right_padded=True: each row of mask_bt is 1s then 0s
    "cache": "a KV-cache call (prefill or decode): queries sit at other slots than the keys",
    "segments": "packed rows (segment_ids): attention restarts at each segment",
    "general": "a mask not declared right-padded (left-padded prompts, PPO's prompt + response)",
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
    attention: str = "auto"  # 'auto' (cuDNN where allowed, else XLA), 'xla' or 'cudnn' (error where refused)

    def __post_init__(self):
        choices = {
            "positions": ("learned", "rope"),
            "norm": ("layernorm", "rmsnorm"),
            "mlp": ("gelu", "swiglu"),
            "head": ("lm", "scalar"),
            "remat": ("none", *REMAT_POLICIES),
            "attention": ("auto", "xla", "cudnn"),
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

    def cudnn_refusal(
        self, mask: str = "prefix", *, deterministic: bool = True, backend: str | None = None
    ) -> str | None:
        """Why cuDNN's fused attention cannot serve a call with this ``mask`` kind (a key of ``MASK_KINDS``),
        or None when it can. ``deterministic=False`` is a training call (attention dropout active if its rate
        is > 0); ``backend`` defaults to ``jax.default_backend()``. Decided from the config and the backend
        alone, so the choice is made once, at trace time."""
        if mask not in MASK_KINDS:
            raise ValueError(f"mask kind {mask!r}: expected one of {sorted(MASK_KINDS)}")
        backend = backend or jax.default_backend()
        if MASK_KINDS[mask]:
            return f"the mask is not causal + lengths: {MASK_KINDS[mask]}"
        nvidia, head_dim_limit = _gpu_facts(backend)
        if not nvidia:
            return f"the backend is {backend}, and cuDNN runs on NVIDIA GPUs only"
        if jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
            return f"dtype={self.dtype}: the fused kernel takes bfloat16 or float16 only"
        h = self.dim_per_head
        if h % 8 or h > head_dim_limit:
            return f"head_dim={h}: the fused kernel needs a multiple of 8 and at most {head_dim_limit} on this GPU"
        if self.attention_dropout_rate > 0 and not deterministic:
            return f"attention_dropout_rate={self.attention_dropout_rate} while training: jax.nn's call has no dropout"
        return None

    def attention_path(self, mask: str = "prefix", *, deterministic: bool = True, backend: str | None = None) -> str:
        """``'cudnn'`` or ``'xla'``: the implementation ``Transformer`` uses for a call with this ``mask`` kind
        (arguments as ``cudnn_refusal``). ``attention='cudnn'`` is an error naming the reason where the
        config, dtype or backend refuses it; a call whose mask kind is not causal + lengths takes XLA under
        every setting (sampling's KV cache, packed rows), so one config serves training and sampling alike."""
        if self.attention == "xla":
            return "xla"
        reason = self.cudnn_refusal(mask, deterministic=deterministic, backend=backend)
        if reason is None:
            return "cudnn"
        if self.attention == "cudnn" and not MASK_KINDS[mask]:
            raise ValueError(f"model.attention='cudnn' is not possible: {reason} (use 'auto' to fall back to XLA)")
        return "xla"


def _gpu_facts(backend: str) -> tuple[bool, int]:
    """(an NVIDIA GPU backend, the largest head_dim cuDNN's fused kernel takes there). The limit is the one
    jax checks before calling cuDNN: 256 from Hopper (compute capability 9.0) on, 128 before. A GPU backend
    that cannot be inspected here (planning on a CPU host) is taken as NVIDIA with the lower limit."""
    if backend != "gpu":
        return False, 0
    try:
        device = jax.devices(backend)[0]
    except RuntimeError:
        return True, 128
    if "rocm" in device.client.platform_version:
        return False, 0
    major, minor = (int(x) for x in getattr(device, "compute_capability", "0.0").split(".")[:2])
    return True, 256 if (major, minor) >= (9, 0) else 128

"""Model presets: architecture, numerics, mesh and sharding rules.

    python scripts/model_info.py --config=configs/model.py:gpt2_124m
    python scripts/model_info.py --config=configs/model.py:llama3_8b --config.mesh_shape="(1,-1,1)"

Presets: tiny (GPT-2 style, CPU tests), tiny_llama (Llama style with GQA), gpt2_124m, gpt2_355m,
gpt2_774m, gpt2_1558m, gpt3_1p3b, gpt3_6p7b, gpt3_175b (the paper's GPT-3 shapes), llama3_8b.

``documented_params`` is the size each preset is known by, with its source; ``tests/test_configs.py``
checks that the model built from the preset has that many parameters (within 1%). GPT-3 uses dense
attention here: Brown et al. alternate dense and locally banded sparse layers, which changes no
parameter count.
"""

import ml_collections

from instructjax.sharding import DEFAULT_RULES

PRESETS = {
    # Test-sized GPT-2: a few hundred thousand parameters, fast on 2 CPU cores.
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_len=128),
    # Test-sized Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention (4 query heads share 2 kv heads).
    "tiny_llama": dict(
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=192,
        max_len=128,
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=False,
    ),
    # GPT-2 (Radford et al. 2019); sizes as Hugging Face's gpt2, gpt2-medium, -large, -xl report them.
    "gpt2_124m": dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_len=1024),
    "gpt2_355m": dict(vocab_size=50257, d_model=1024, n_layers=24, n_heads=16, d_ff=4096, max_len=1024),
    "gpt2_774m": dict(vocab_size=50257, d_model=1280, n_layers=36, n_heads=20, d_ff=5120, max_len=1024),
    "gpt2_1558m": dict(vocab_size=50257, d_model=1600, n_layers=48, n_heads=25, d_ff=6400, max_len=1024),
    # GPT-3 shapes (Brown et al. 2020, Table 2.1): the paper's 1.3B, 6B and 175B policies and RMs.
    "gpt3_1p3b": dict(vocab_size=50257, d_model=2048, n_layers=24, n_heads=16, d_ff=8192, max_len=2048),
    "gpt3_6p7b": dict(vocab_size=50257, d_model=4096, n_layers=32, n_heads=32, d_ff=16384, max_len=2048),
    "gpt3_175b": dict(vocab_size=50257, d_model=12288, n_layers=96, n_heads=96, d_ff=49152, max_len=2048),
    # Llama 3 8B (Meta, 2024): GQA 32/8, SwiGLU 14336, RoPE theta 500k, untied 128k vocabulary.
    "llama3_8b": dict(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        max_len=8192,
        positions="rope",
        rope_theta=500000.0,
        norm="rmsnorm",
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=False,
    ),
}

DOCUMENTED_PARAMS = {
    "tiny": 141_056,  # our own size, stated in docs/architecture.md
    "tiny_llama": 164_160,
    "gpt2_124m": 124_439_808,  # Hugging Face gpt2
    "gpt2_355m": 354_823_168,  # gpt2-medium
    "gpt2_774m": 774_030_080,  # gpt2-large
    "gpt2_1558m": 1_557_611_200,  # gpt2-xl
    "gpt3_1p3b": 1_315_700_000,  # labelled "1.3B" by Brown et al.; their Table 2.1 shapes give 1.3157B
    "gpt3_6p7b": 6_700_000_000,  # "6.7B"
    "gpt3_175b": 175_000_000_000,  # "175B"
    "llama3_8b": 8_030_261_248,  # Meta-Llama-3-8B on Hugging Face
}

# Presets too large to init eagerly: scan the layers (one compiled block) and rematerialise.
_LARGE = {"gpt3_1p3b", "gpt3_6p7b", "gpt3_175b", "llama3_8b", "gpt2_774m", "gpt2_1558m"}


def model_config(name: str) -> ml_collections.ConfigDict:
    """The ``model`` section for preset ``name``: every field of ``instructjax.model.ModelConfig``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    m = ml_collections.ConfigDict()
    # --- shape ---
    m.vocab_size = 0  # tokenizer vocabulary size (embedding rows)
    m.d_model = 0  # residual stream width D
    m.n_layers = 0  # number of Transformer blocks L
    m.n_heads = 0  # query heads N
    m.n_kv_heads = 0  # key/value heads K for grouped-query attention; 0 = n_heads (plain multi-head)
    m.head_dim = 0  # per-head width H; 0 = d_model // n_heads
    m.d_ff = 0  # MLP hidden width F (4D for GPT-2/3; SwiGLU uses about 8D/3)
    m.max_len = 0  # longest sequence (learned position table size; RoPE has no table)
    # --- architecture family: GPT-2 defaults, the Llama presets override ---
    m.positions = "learned"  # 'learned' absolute positions (GPT-2/3) or 'rope' (Llama)
    m.rope_theta = 10000.0  # RoPE base frequency (Llama 2: 1e4, Llama 3: 5e5)
    m.norm = "layernorm"  # 'layernorm' (GPT-2/3) or 'rmsnorm' (Llama)
    m.norm_eps = 1e-5  # epsilon inside the norm
    m.mlp = "gelu"  # 'gelu' (tanh approximation, GPT-2) or 'swiglu' (Llama)
    m.use_bias = True  # biases on all dense layers and LayerNorm (GPT-2); False for Llama
    m.qkv_bias = False  # biases on q/k/v only, as in Qwen2 (implied by use_bias)
    m.tie_embeddings = True  # output projection = token embedding transposed (GPT-2); Llama unties
    m.head = "lm"  # 'lm': next-token logits; 'scalar': reward/value per token (RM and value model)
    # --- regularisation and init ---
    m.dropout_rate = 0.0  # embedding + residual dropout; the paper's SFT uses 0.2 (off in every PPO pass)
    m.attention_dropout_rate = 0.0  # dropout on attention probabilities (not used by the paper)
    m.init_std = 0.02  # normal init std; residual output projections use init_std / sqrt(2 L)
    # --- numerics and memory ---
    m.dtype = "float32"  # compute dtype ('bfloat16' on accelerators; params stay in param_dtype)
    m.param_dtype = "float32"  # storage dtype of params (f32 master weights, as the paper's fp16+fp32)
    # Activation checkpointing per block: 'none', 'full' or 'dots' (save matmuls). Use it with scan_layers: on
    # XLA:CPU, remat of unscanned blocks left the memory plan unchanged (docs/benchmarks.md, PPO at real shapes).
    m.remat = "none"
    m.scan_layers = False  # lax.scan over stacked layers: compile time independent of depth
    m.attention = "auto"  # 'auto' (cuDNN's fused kernel where a GPU call allows it, docs/gpu.md), 'xla', 'cudnn'
    m.update(PRESETS[name])
    if name in _LARGE:
        m.update(dict(dtype="bfloat16", remat="full", scan_layers=True))
    return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``configs/model.py:<preset>`` (default ``tiny``)."""
    name = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.preset = name  # which preset this is (informational)
    c.model = model_config(name)  # architecture, see model_config()
    c.documented_params = DOCUMENTED_PARAMS[name]  # the size this preset is known by (checked in tests)
    c.mesh_shape = (1, -1, 1)  # (data, fsdp, tensor); -1 fills with the remaining devices
    c.rules = [list(r) for r in DEFAULT_RULES]  # logical axis -> mesh axes, in priority order
    c.seed = 0  # parameter init seed
    return c

"""Sampling throughput: generate() (KV cache) vs full-recompute decoding vs transformers' generate().

    python benchmarks/sampling.py                       # GPT-2-shaped random model, ~20M parameters
    python benchmarks/sampling.py --batch=16 --prompt=32 --new=128 --repeats=3

All three decode the same shapes in one run (batch 16, prompt 32, 128 new tokens, no early stop:
EOS is disabled), timed after a warm-up call and taking turns (one repeat of each per round), so a
busy spell of the machine slows them alike; each figure is the best of ``--repeats``. transformers
is measured only when torch and transformers are importable (CPU torch here). The compute limit is
2·params FLOPs per token at the float32 matmul rate measured on this machine in the same run
(``--dtype=bfloat16`` runs both models and the matmul in bf16). ``--skip_recompute`` leaves out the
slow full-recompute decoding. The last line printed is a JSON object.

The full-recompute baseline is capped so that the whole command ends within 5 minutes on a 2-core CPU
(uncapped, its 4 calls of 128 steps took most of that alone): it decodes ``--recompute_new`` tokens (32) instead
of ``--new``, and its tokens/s is scaled to ``--new``. Each of its steps runs the model over the whole
buffer of prompt + new tokens, whatever the step, so a step costs ∝ (prompt + new) and

    recompute tokens/s at new = measured tokens/s at recompute_new × (prompt + recompute_new) / (prompt + new)

The scaling is linear in length: attention's quadratic part (about 2% of a step's FLOPs here) would lower the
true figure, the per-step costs that do not grow with length (the draw over the vocabulary, the prefill)
raise it. Checked at 64 new tokens, taking turns in one process (machine G): uncapped 22.4 tokens/s, capped
at 16 and scaled 23.2, capped at 32 and scaled 21.7. ``recompute_cap`` in the output says which cap applied
(null when ``--new`` is within it, or with ``--recompute_new=0``).
"""

import argparse
import json
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
from timing import best_interleaved, jax_matmul_run, matmul_flops_per_s

from instructjax import sampling
from instructjax.model import ModelConfig, Transformer, count_params


def gpt2_shaped(d_model: int, n_layers: int, dtype: str = "float32") -> ModelConfig:
    return ModelConfig(
        vocab_size=50257,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=d_model // 64,
        d_ff=4 * d_model,
        max_len=1024,
        dtype=dtype,
        param_dtype=dtype,
    )


def transformers_run(cfg: ModelConfig, prompt: np.ndarray, new: int) -> Callable[[], None] | None:
    """``GPT2LMHeadModel.generate`` on a random model of the same shape; None without torch/transformers."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads
    )
    model = transformers.GPT2LMHeadModel(hf_cfg).to(getattr(torch, cfg.dtype)).eval()
    ids = torch.tensor(prompt, dtype=torch.long)

    def run():
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=True,
                top_k=0,
                pad_token_id=0,
            )
        assert out.shape[1] == prompt.shape[1] + new

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="params and compute, both sides"
    )
    parser.add_argument("--skip_recompute", action="store_true", help="leave out full-recompute decoding (slow)")
    parser.add_argument(
        "--recompute_new", type=int, default=32, help="new tokens the recompute baseline decodes (scaled); 0: --new"
    )
    args = parser.parse_args()

    cfg = gpt2_shaped(args.d_model, args.n_layers, args.dtype)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"])
    n_params = count_params(params)
    prompt = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(prompt)
    tokens = args.batch * args.new

    def ours(use_cache: bool, new: int) -> Callable[[], None]:
        def run():
            out = sampling.generate(
                params,
                cfg,
                prompt,
                mask,
                jax.random.key(0),
                max_new_tokens=new,
                eos_id=-1,
                temperature=1.0,
                use_cache=use_cache,
            )
            assert int(out.steps) == new
            jax.block_until_ready(out)

        return run

    recompute_new = min(args.recompute_new or args.new, args.new)
    runs = {"generate": ours(True, args.new), "matmul": jax_matmul_run(args.dtype)}
    if not args.skip_recompute:
        runs["recompute"] = ours(False, recompute_new)
    if (hf := transformers_run(cfg, prompt, args.new)) is not None:
        runs["transformers"] = hf
    seconds = best_interleaved(runs, args.repeats)
    per_s = {name: tokens / s for name, s in seconds.items() if name not in ("matmul", "recompute")}
    cap = None
    if "recompute" in seconds:
        measured = args.batch * recompute_new / seconds["recompute"]
        # a recompute step costs ∝ prompt + new tokens (module docstring): scale to the full --new
        per_s["recompute"] = measured * (args.prompt + recompute_new) / (args.prompt + args.new)
        if recompute_new < args.new:
            cap = dict(
                new_tokens=recompute_new,
                scaled_to=args.new,
                measured_tokens_per_s=measured,
                scale=(args.prompt + recompute_new) / (args.prompt + args.new),
            )

    result = {
        "device": jax.devices()[0].device_kind,
        "params": n_params,
        "dtype": args.dtype,
        "shape": dict(batch=args.batch, prompt=args.prompt, new_tokens=args.new),
        "generate_tokens_per_s": per_s["generate"],
        "recompute_tokens_per_s": per_s.get("recompute"),
        "recompute_cap": cap,
        "transformers_tokens_per_s": per_s.get("transformers"),
        "compute_limit_tokens_per_s": matmul_flops_per_s(seconds["matmul"]) / (2 * n_params),
    }
    if result["recompute_tokens_per_s"]:
        result["speedup_vs_recompute"] = result["generate_tokens_per_s"] / result["recompute_tokens_per_s"]
    if result["transformers_tokens_per_s"]:
        result["speedup_vs_transformers"] = result["generate_tokens_per_s"] / result["transformers_tokens_per_s"]
    result["fraction_of_compute_limit"] = result["generate_tokens_per_s"] / result["compute_limit_tokens_per_s"]
    rounded = lambda value: round(value, 3 if value < 10 else 1) if isinstance(value, float) else value
    for key, value in result.items():
        result[key] = {k: rounded(v) for k, v in value.items()} if isinstance(value, dict) else rounded(value)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

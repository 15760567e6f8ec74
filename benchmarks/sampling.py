"""Sampling throughput: generate() (KV cache) vs full-recompute decoding vs transformers' generate().

    python benchmarks/sampling.py                       # GPT-2-shaped random model, ~20M parameters
    python benchmarks/sampling.py --batch=16 --prompt=32 --new=128 --repeats=3

All three decode the same shapes in one run (batch 16, prompt 32, 128 new tokens, no early stop:
EOS is disabled), timed after a warm-up call. transformers is measured only when torch and
transformers are importable (CPU torch here). The compute limit is 2·params FLOPs per token at the
float32 matmul rate measured on this machine in the same run. The last line printed is a JSON object.
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instructjax import sampling
from instructjax.model import ModelConfig, Transformer, count_params


def gpt2_shaped(d_model: int, n_layers: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=50257, d_model=d_model, n_layers=n_layers, n_heads=d_model // 64, d_ff=4 * d_model, max_len=1024
    )


def best_of(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops_per_second(n: int = 1024, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    seconds = best_of(lambda: f(a).block_until_ready(), repeats)
    return 2 * n**3 / seconds


def transformers_tokens_per_second(cfg: ModelConfig, prompt: np.ndarray, new: int, repeats: int) -> float | None:
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads
    )
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
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

    return prompt.shape[0] * new / best_of(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = gpt2_shaped(args.d_model, args.n_layers)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"])
    n_params = count_params(params)
    prompt = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(prompt)
    tokens = args.batch * args.new

    def ours(use_cache):
        def run():
            out = sampling.generate(
                params,
                cfg,
                prompt,
                mask,
                jax.random.key(0),
                max_new_tokens=args.new,
                eos_id=-1,
                temperature=1.0,
                use_cache=use_cache,
            )
            assert int(out.steps) == args.new
            jax.block_until_ready(out)

        return tokens / best_of(run, args.repeats)

    result = {
        "device": jax.devices()[0].device_kind,
        "params": n_params,
        "shape": dict(batch=args.batch, prompt=args.prompt, new_tokens=args.new),
        "generate_tokens_per_s": ours(True),
        "recompute_tokens_per_s": ours(False),
        "transformers_tokens_per_s": transformers_tokens_per_second(cfg, prompt, args.new, args.repeats),
        "compute_limit_tokens_per_s": matmul_flops_per_second() / (2 * n_params),
    }
    result["speedup_vs_recompute"] = result["generate_tokens_per_s"] / result["recompute_tokens_per_s"]
    if result["transformers_tokens_per_s"]:
        result["speedup_vs_transformers"] = result["generate_tokens_per_s"] / result["transformers_tokens_per_s"]
    result["fraction_of_compute_limit"] = result["generate_tokens_per_s"] / result["compute_limit_tokens_per_s"]
    for key, value in result.items():
        if isinstance(value, float):
            result[key] = round(value, 3 if value < 10 else 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

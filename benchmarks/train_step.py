"""SFT train-step throughput: our jitted step vs the f32 matmul peak and vs a PyTorch/transformers step.

    python benchmarks/train_step.py                  # GPT-2-shaped, ~20M params, seq 256, batch 8, AdamW
    python benchmarks/train_step.py --batch=16 --repeats=5

FLOPs per step use MaxText's causal training formula (reference/performance.md §4,
``metrics.training_flops_per_token``) for both frameworks; each is divided by its own f32 matmul rate
measured in the same run (jit ``a @ a`` / ``torch.mm``, 1024x1024). The transformers step
(GPT2LMHeadModel, torch AdamW, same shapes) runs only when torch and transformers are importable.
The last line printed is a JSON object.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from instructjax import losses, sharding, steps
from instructjax.metrics import training_flops_per_token
from instructjax.model import ModelConfig, Transformer, unembedding


def best_of(fn, repeats: int) -> float:
    fn()
    fn()  # compile, warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def jax_matmul_peak(n: int = 1024) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / best_of(lambda: f(a).block_until_ready(), 5)


def torch_step_seconds(cfg: ModelConfig, batch: int, seq: int, repeats: int) -> tuple[float, float] | None:
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    a = torch.ones(1024, 1024)
    peak = 2 * 1024**3 / best_of(lambda: torch.mm(a, a), 5)
    hf = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return best_of(step, repeats), peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=512, help="positions per chunk of the fused LM loss")
    args = parser.parse_args()

    cfg = ModelConfig(
        vocab_size=50257,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.d_model // 64,
        d_ff=4 * args.d_model,
        max_len=1024,
    )
    model = Transformer(cfg)
    mesh, rules = sharding.make_mesh((1, -1, 1)), sharding.DEFAULT_RULES
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.0)
    example = np.zeros((1, args.seq), np.int32)
    state, state_sh = steps.create_train_state(lambda r: model.init(r, example)["params"], tx, mesh, rules, 0)

    def loss_fn(params, batch, rng):  # as train_sft: fused LM head + cross-entropy
        hidden = model.apply({"params": params}, batch["tokens"], batch["mask"], return_hidden=True)
        loss, n = losses.fused_lm_loss(hidden, unembedding(params, cfg), batch["tokens"], batch["mask"], args.chunk)
        return loss, {"tokens": n}

    train_step = steps.make_train_step(loss_fn, tx, state_sh)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    with sharding.use(mesh, rules):
        batch = sharding.to_global({"tokens": tokens, "mask": np.ones_like(tokens)}, mesh, rules)
        holder = [state]

        def run():
            holder[0], out = train_step(holder[0], batch)
            jax.block_until_ready(out["loss"])

        seconds = best_of(run, args.repeats)
    n_tokens = args.batch * args.seq
    flops = training_flops_per_token(cfg, args.seq) * n_tokens
    peak = jax_matmul_peak()
    result = {
        "device": jax.devices()[0].device_kind,
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "shape": dict(batch=args.batch, seq=args.seq),
        "step_seconds": seconds,
        "tokens_per_s": n_tokens / seconds,
        "flops_per_s": flops / seconds,
        "matmul_peak_flops_per_s": peak,
        "fraction_of_peak": flops / seconds / peak,
    }
    torch_result = torch_step_seconds(cfg, args.batch, args.seq, args.repeats)
    if torch_result is not None:
        torch_seconds, torch_peak = torch_result
        result.update(
            torch_tokens_per_s=n_tokens / torch_seconds,
            torch_fraction_of_peak=flops / torch_seconds / torch_peak,
            torch_matmul_peak_flops_per_s=torch_peak,
            speedup_vs_torch=torch_seconds / seconds,
        )
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()

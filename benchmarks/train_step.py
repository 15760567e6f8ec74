"""SFT train-step throughput: our jitted step vs the f32 matmul peak and vs a PyTorch/transformers step.

    python benchmarks/train_step.py                  # GPT-2-shaped, ~20M params, seq 256, batch 8, AdamW
    python benchmarks/train_step.py --batch=16 --repeats=5

FLOPs per step use MaxText's causal training formula (``metrics.training_flops_per_token``; MaxText's
``calculate_tflops_training_per_device``, docs/references.md) for both frameworks; each is divided by
its own f32 matmul rate measured in the same run (jit ``a @ a`` / ``torch.mm``, 1024x1024). The transformers step
(GPT2LMHeadModel, torch AdamW, same shapes) runs only when torch and transformers are importable.
The steps and the matmuls take turns, one repeat of each per round (``timing.best_interleaved``), so
a busy spell of the machine slows them alike; each figure is the best of ``--repeats``.
The last line printed is a JSON object.
"""

import argparse
import json
from collections.abc import Callable

import jax
import numpy as np
import optax
from timing import MATMUL_N, best_interleaved, jax_matmul_run, matmul_flops_per_s

from instructjax import losses, sharding, steps
from instructjax.metrics import training_flops_per_token
from instructjax.model import ModelConfig, Transformer, unembedding


def torch_runs(cfg: ModelConfig, batch: int, seq: int) -> dict[str, Callable[[], None]]:
    """The transformers train step and torch's MATMUL_N² matmul; empty without torch/transformers."""
    try:
        import torch
        import transformers
    except ImportError:
        return {}
    torch.manual_seed(0)
    a = torch.ones(MATMUL_N, MATMUL_N)
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

    return {"torch_step": step, "torch_matmul": lambda: torch.mm(a, a)}


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

        runs = {"step": run, "matmul": jax_matmul_run(), **torch_runs(cfg, args.batch, args.seq)}
        seconds = best_interleaved(runs, args.repeats, warmups=2)
    n_tokens = args.batch * args.seq
    flops = training_flops_per_token(cfg, args.seq) * n_tokens
    peak = matmul_flops_per_s(seconds["matmul"])
    result = {
        "device": jax.devices()[0].device_kind,
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "shape": dict(batch=args.batch, seq=args.seq),
        "step_seconds": seconds["step"],
        "tokens_per_s": n_tokens / seconds["step"],
        "flops_per_s": flops / seconds["step"],
        "matmul_peak_flops_per_s": peak,
        "fraction_of_peak": flops / seconds["step"] / peak,
    }
    if "torch_step" in seconds:
        torch_peak = matmul_flops_per_s(seconds["torch_matmul"])
        result.update(
            torch_tokens_per_s=n_tokens / seconds["torch_step"],
            torch_fraction_of_peak=flops / seconds["torch_step"] / torch_peak,
            torch_matmul_peak_flops_per_s=torch_peak,
            speedup_vs_torch=seconds["torch_step"] / seconds["step"],
        )
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()

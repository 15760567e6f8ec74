"""Reward-model train step: padded batches (every prompt padded to k_max = 9 completions) vs packed batches
(``data.pack_rows``: a fixed budget of completion rows, whole prompts), on one dataset with K uniform in 2..9.

    python benchmarks/rm_step.py                    # GPT-2-shaped random RM, d_model 256, 4 layers, seq 64
    python benchmarks/rm_step.py --d_model=768 --n_layers=12 --seq=512 --prompts=64   # GPT-2 small, batch 64

Both steps are ``steps.make_train_step`` over ``train_rm.make_loss_fn`` with AdamW, the state donated, as
``train_rm`` runs them; their batches come from the real pipelines (``comparison_batches``,
``packed_comparison_batches``) over ``--records`` comparisons. A step's time does not depend on what its batch
holds (one shape per layout), so the epoch's throughput is

    pairs/s = (ranked pairs in the dataset) / (batches in the epoch × seconds per step)

and the padding fraction is ``1 - Σ K / (batches × completion rows per batch)``. The steps and a jitted
1024² f32 matmul take turns (``timing.best_interleaved``), so the packed/padded ratio is measured in one run.

When torch, transformers and trl import, TRL's ``RewardTrainer`` step is timed too, written out
(``GPT2ForSequenceClassification`` with one label, chosen and rejected rows in one batch, ``-log σ(r_c - r_r)``
averaged over the pairs, ``torch.optim.AdamW``) on the same shape at K = 2, against our padded step at K = 2;
otherwise its figures are null. The last line printed is a JSON object.
"""

import argparse
import json
import math
import random
from collections.abc import Callable

import jax
import numpy as np
import optax
from timing import best_interleaved, jax_matmul_run, matmul_flops_per_s

from instructjax import sharding, steps, train_rm
from instructjax.data import formats, pipeline
from instructjax.model import ModelConfig, Transformer
from instructjax.tokenizer import Tokenizer

K_MAX = formats.MAX_K


def number_tokenizer(vocab: int) -> Tokenizer:
    """Text is space-separated token ids (PAD 0, EOS 1): the pipelines run as on real text."""
    return Tokenizer(
        "hf", vocab, 0, 1, None, lambda t: [int(w) for w in t.split()], lambda ids: " ".join(map(str, ids))
    )


def make_records(n: int, seq: int, vocab: int, k_min: int, seed: int = 0) -> list[dict]:
    """``n`` stored comparison records, K uniform in ``k_min``..9, strict rankings, prompt and completion
    lengths that fit ``seq`` (prompt up to seq/3, completion up to seq/2)."""
    rng = random.Random(seed)
    words = lambda lo, hi: " ".join(str(rng.randrange(2, vocab)) for _ in range(rng.randint(lo, hi)))
    records = []
    for _ in range(n):
        k = rng.randint(k_min, K_MAX)
        order = list(range(k))
        rng.shuffle(order)
        records.append(
            {
                "prompt": words(4, seq // 3),
                "completions": [words(2, seq // 2) for _ in range(k)],
                "ranking": json.dumps([[i] for i in order]),
            }
        )
    return records


def trl_runs(cfg: ModelConfig, pairs: int, seq: int) -> dict[str, Callable[[], None]]:
    """TRL's reward step written out, on a random model of the same shape: empty without torch/transformers/trl."""
    try:
        import torch
        import transformers
        import trl  # noqa: F401  (measured only where TRL itself is installed, as the comparison is with it)
    except ImportError:
        return {}
    torch.manual_seed(0)
    hf = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        num_labels=1,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2ForSequenceClassification(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.randint(2, cfg.vocab_size, (2 * pairs, seq))  # chosen rows, then rejected rows, as TRL's collator
    mask = torch.ones_like(ids)

    def step():
        opt.zero_grad(set_to_none=True)
        rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(rewards[:pairs] - rewards[pairs:]).mean()
        loss.backward()
        opt.step()

    return {"trl_k2": step}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq", type=int, default=64, help="tokens per completion row (prompt + completion + EOS)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per padded batch")
    parser.add_argument(
        "--pack_rows", type=int, default=0, help="rows per packed batch; 0: prompts x mean K, up to a multiple of 8"
    )
    parser.add_argument("--k_min", type=int, default=2, help="K uniform in k_min..9")
    parser.add_argument("--records", type=int, default=512, help="comparisons in the dataset")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=max(args.d_model // 64, 1),
        d_ff=4 * args.d_model,
        max_len=max(args.seq, 1024),
        head="scalar",
    )
    model = Transformer(cfg)
    mesh, rules = sharding.make_mesh((1, -1, 1)), sharding.DEFAULT_RULES
    fmt = pipeline.TextFormat(number_tokenizer(args.vocab), max_len=args.seq, max_prompt_len=args.seq // 2)
    source = make_records(args.records, args.seq, args.vocab, args.k_min)
    ks = [len(r["completions"]) for r in source]
    pairs = sum(math.comb(k, 2) for k in ks)
    divisor = sharding.batch_divisor(mesh, rules)
    rows = args.pack_rows or -(-round(args.prompts * np.mean(ks)) // 8) * 8

    # The epoch of each layout, through the real pipelines: how many batches, how much of them is padding.
    padded = list(pipeline.comparison_batches(source, fmt, args.prompts, 0, k_max=K_MAX, num_epochs=1))
    plan = pipeline.packed_plan(source, rows, 0, groups=train_rm.packed_groups(rows, divisor), num_epochs=1)
    packed = list(pipeline.packed_comparison_batches(source, fmt, plan))
    layouts = {"padded": (padded, args.prompts * K_MAX), "packed": (packed, rows)}

    tx = optax.adamw(1e-5, b1=0.9, b2=0.95, weight_decay=0.0)
    example = np.zeros((1, args.seq), np.int32)
    loss_fn = train_rm.make_loss_fn(model)

    def step_run(batch: dict) -> Callable[[], None]:
        state, state_sh = steps.create_train_state(lambda r: model.init(r, example)["params"], tx, mesh, rules, 0)
        train_step = steps.make_train_step(loss_fn, tx, state_sh)
        global_batch = sharding.to_global(batch, mesh, rules)
        holder = [state]

        def run():
            holder[0], out = train_step(holder[0], global_batch)
            jax.block_until_ready(out["loss"])

        return run

    trl = trl_runs(cfg, args.prompts, args.seq)
    with sharding.use(mesh, rules):
        runs = {name: step_run(batches[0]) for name, (batches, _) in layouts.items()}
        if trl:  # our step on the pairs TRL takes: K = 2, the padded layout (nothing to pad)
            pair_records = make_records(args.prompts, args.seq, args.vocab, k_min=2)
            for r in pair_records:
                r["completions"], r["ranking"] = r["completions"][:2], json.dumps([[0], [1]])
            k2 = next(iter(pipeline.comparison_batches(pair_records, fmt, args.prompts, 0, k_max=2, num_epochs=1)))
            runs["ours_k2"] = step_run(k2)
        runs.update(matmul=jax_matmul_run(), **trl)
        seconds = best_interleaved(runs, args.repeats, warmups=2)

    result = {
        "device": jax.devices()[0].device_kind,
        "params": int(sum(x.size for x in jax.tree.leaves(model.init(jax.random.key(0), example)["params"]))),
        "shape": dict(d_model=args.d_model, n_layers=args.n_layers, vocab=args.vocab, seq=args.seq),
        "data": dict(records=args.records, k=f"{args.k_min}..{K_MAX}", mean_k=float(np.mean(ks)), pairs=pairs),
        "matmul_flops_per_s": matmul_flops_per_s(seconds["matmul"]),
    }
    for name, (batches, rows_per_batch) in layouts.items():
        result[name] = {
            "rows_per_batch": rows_per_batch,
            "prompts_per_batch": args.prompts if name == "padded" else round(args.records / len(batches), 2),
            "batches": len(batches),
            "step_seconds": seconds[name],
            "padding_fraction": 1 - sum(ks) / (len(batches) * rows_per_batch),
            "pairs_per_s": pairs / (len(batches) * seconds[name]),
        }
    result["packed_over_padded"] = result["packed"]["pairs_per_s"] / result["padded"]["pairs_per_s"]
    result["trl_k2_pairs_per_s"] = args.prompts / seconds["trl_k2"] if trl else None
    result["ours_k2_pairs_per_s"] = args.prompts / seconds["ours_k2"] if trl else None
    result["ours_over_trl_k2"] = seconds["trl_k2"] / seconds["ours_k2"] if trl else None
    rounded = lambda v: round(v, 4 if abs(v) < 10 else 1) if isinstance(v, float) else v
    print(
        json.dumps(
            {k: {a: rounded(b) for a, b in v.items()} if isinstance(v, dict) else rounded(v) for k, v in result.items()}
        )
    )


if __name__ == "__main__":
    main()

"""What one accelerator does with this codebase: SFT train-step MFU, decode against the HBM roofline, and one
PPO-ptx iteration split into its phases. One command, one JSON line (and a table):

    python benchmarks/accelerator.py                 # on a GPU: GPT-3 1.3B SFT and decode, PPO at 124M and 1.3B
    python benchmarks/accelerator.py --smoke         # the same code at tiny shapes (CPU; tests/test_benchmarks.py)
    python benchmarks/accelerator.py --skip=sft      # leave a part out: sft, decode, ppo

1. **SFT train step**: the GPT-3 1.3B shape (configs/model.py ``gpt3_1p3b``: bf16 compute, f32 master weights,
   remat, scanned layers), sequence 2,048, AdamW; the largest per-device batch of ``--sft_batches`` that fits.
   MFU = MaxText's training FLOPs per token (``metrics.training_flops_per_token``) × tokens / step time /
   the device's bf16 peak.
2. **Decode**: ``sampling.generate`` with the KV cache, 1.3B bf16, batch 64, prompt 256, 256 new tokens (EOS
   off). Roofline: each decode step reads every parameter and the KV cache once, so tokens/s ≤ batch ×
   bandwidth / (parameter bytes + mean KV-cache bytes per step).
3. **PPO-ptx iteration** at the 124M and 1.3B shapes: generate, score (policy, reference, value, RM) and the
   minibatch updates with 8 pretraining rows per episode, as ``train_ppo.make_iteration`` runs them (random
   weights; 32 episodes of 256 + 256 tokens, minibatch 8): ``benchmarks/ppo_iteration.py``'s ``measure``.

Peak figures (``DEVICES``): the vendors' dense bf16 tensor-core FLOP/s and HBM bandwidth from their data
sheets (NVIDIA H100 SXM: 989 TFLOP/s, 3.35 TB/s; H200: 989 TFLOP/s, 4.8 TB/s; A100 SXM 80 GB: 312 TFLOP/s,
2.04 TB/s; 40 GB: 1.56 TB/s). Elsewhere (CPU, ``--smoke``) both are measured in the run: a jitted bf16 matmul
and an array copy. Every timing is the best of ``--repeats`` after a warm-up call (compilation).
"""

import argparse
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import ppo_iteration  # benchmarks/ppo_iteration.py: this directory is on the path when run as a script

from instructjax import configlib, losses, sampling, sharding, steps
from instructjax.metrics import training_flops_per_token
from instructjax.model import ModelConfig, Transformer, count_params, unembedding

# device kind prefix: (dense bf16 FLOP/s, HBM bytes/s), from the vendors' data sheets
DEVICES = {
    "NVIDIA H200": (9.89e14, 4.8e12),
    "NVIDIA H100": (9.89e14, 3.35e12),
    "NVIDIA A100-SXM4-80GB": (3.12e14, 2.039e12),
    "NVIDIA A100-SXM4-40GB": (3.12e14, 1.555e12),
}
REPO_CONFIGS = __file__.rsplit("/benchmarks/", 1)[0] + "/configs"


def best_seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def device_peaks(repeats: int) -> dict:
    kind = jax.devices()[0].device_kind
    for prefix, (flops, bandwidth) in DEVICES.items():
        if kind.startswith(prefix):
            return {"device": kind, "peak_flops_per_s": flops, "hbm_bytes_per_s": bandwidth, "peaks": "data sheet"}
    a = jnp.ones((1024, 1024), jnp.bfloat16)
    matmul = jax.jit(lambda x: x @ x)
    flops = 2 * 1024**3 / best_seconds(lambda: matmul(a).block_until_ready(), repeats)
    big = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB
    copy = jax.jit(lambda x: x + 1)
    bandwidth = 2 * big.nbytes / best_seconds(lambda: copy(big).block_until_ready(), repeats)
    return {"device": kind, "peak_flops_per_s": flops, "hbm_bytes_per_s": bandwidth, "peaks": "measured"}


def model_cfg(preset: str, **overrides) -> ModelConfig:
    cfg = configlib.load_config(f"{REPO_CONFIGS}/model.py:{preset}").model.to_dict()
    return ModelConfig.from_dict({**cfg, "dropout_rate": 0.0, **overrides})


def sft_mfu(cfg: ModelConfig, seq: int, batches: list[int], peak: float, repeats: int) -> dict:
    """The largest batch of ``batches`` whose train step runs, and its MFU."""
    mesh, rules = sharding.make_mesh((1, -1, 1)), sharding.DEFAULT_RULES
    model, tx = Transformer(cfg), optax.adamw(1e-5, b1=0.9, b2=0.95)
    example = np.zeros((1, seq), np.int32)

    def loss_fn(params, batch, rng):  # as train_sft: fused LM head + cross-entropy
        hidden = model.apply({"params": params}, batch["tokens"], batch["mask"], return_hidden=True, right_padded=True)
        loss, n = losses.fused_lm_loss(hidden, unembedding(params, cfg), batch["tokens"], batch["mask"], 512)
        return loss, {"tokens": n}

    def time_step(batch_size: int) -> tuple[float, int]:
        state, state_sh = steps.create_train_state(lambda r: model.init(r, example)["params"], tx, mesh, rules, 0)
        train_step = steps.make_train_step(loss_fn, tx, state_sh)
        tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch_size, seq)).astype(np.int32)
        with sharding.use(mesh, rules):
            batch = sharding.to_global({"tokens": tokens, "mask": np.ones_like(tokens)}, mesh, rules)
            holder = [state]

            def run():
                holder[0], out = train_step(holder[0], batch)
                jax.block_until_ready(out["loss"])

            return best_seconds(run, repeats), count_params(holder[0].params)

    for batch_size in sorted(batches, reverse=True):
        try:
            seconds, n_params = time_step(batch_size)
        except Exception as e:  # out of memory at this batch: try the next smaller one
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            continue
        flops = training_flops_per_token(cfg, seq) * batch_size * seq
        return {
            "batch": batch_size,
            "seq": seq,
            "step_s": seconds,
            "tokens_per_s": batch_size * seq / seconds,
            "mfu": flops / seconds / peak,
            "params": n_params,
        }
    raise RuntimeError(f"no batch of {batches} fits")


def decode_roofline(cfg: ModelConfig, batch: int, prompt: int, new: int, bandwidth: float, repeats: int) -> dict:
    params, _ = sharding.init_params(
        Transformer(cfg),
        jax.random.key(0),
        np.zeros((1, 4), np.int32),
        sharding.make_mesh((1, -1, 1)),
        sharding.DEFAULT_RULES,
    )
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(cfg.dtype)), params)  # served in the compute dtype
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    mask = np.ones_like(tokens)

    def run():
        out = sampling.generate(params, cfg, tokens, mask, jax.random.key(0), max_new_tokens=new, eos_id=-1)
        jax.block_until_ready(out)

    seconds = best_seconds(run, repeats)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    param_bytes = sum(x.size for x in jax.tree.leaves(params)) * itemsize
    kv_row_bytes = 2 * cfg.n_layers * cfg.num_kv_heads * cfg.dim_per_head * itemsize  # K and V, one cache slot
    kv_bytes = batch * kv_row_bytes * sampling.kv_slots_per_step(prompt, new)
    roofline = batch * bandwidth / (param_bytes + kv_bytes)
    measured = batch * new / seconds
    return {
        "batch": batch,
        "prompt": prompt,
        "new": new,
        "seconds": seconds,
        "tokens_per_s": measured,
        "roofline_tokens_per_s": roofline,
        "fraction_of_roofline": measured / roofline,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: the same code on CPU in seconds")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sft_batches", default="32,16,8,4,2,1", help="per-device SFT batches to try, largest first")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: sft, decode, ppo")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    peaks = device_peaks(args.repeats)
    result: dict = dict(peaks, attention=model_cfg("gpt3_1p3b").attention_path("prefix"))
    if args.smoke:
        big, small = model_cfg("tiny", dtype="bfloat16"), model_cfg("tiny", dtype="bfloat16")
        sft_seq, decode_shape, ppo_shape = 64, (4, 8, 8), (16, 8, 8, 8, 8)
    else:
        big = model_cfg("gpt3_1p3b")
        small = model_cfg("gpt2_124m", dtype="bfloat16")
        sft_seq, decode_shape, ppo_shape = 2048, (64, 256, 256), (32, 256, 256, 8, 8)
    if "sft" not in skip:
        batches = [int(b) for b in args.sft_batches.split(",")]
        result["sft"] = sft_mfu(big, sft_seq, batches, peaks["peak_flops_per_s"], args.repeats)
    if "decode" not in skip:
        result["decode"] = decode_roofline(big, *decode_shape, peaks["hbm_bytes_per_s"], args.repeats)
    if "ppo" not in skip:
        sizes = (("small", small),) if args.smoke else (("small", small), ("large", big))
        result["ppo"] = {name: ppo_iteration.measure(cfg, *ppo_shape, args.repeats) for name, cfg in sizes}
    print(
        f"device: {result['device']}; peaks ({peaks['peaks']}): {peaks['peak_flops_per_s']:.3g} FLOP/s, "
        f"{peaks['hbm_bytes_per_s']:.3g} B/s; attention: {result['attention']}"
    )
    if "sft" in result:
        s = result["sft"]
        print(f"SFT step      batch {s['batch']} x {s['seq']}: {s['tokens_per_s']:.4g} tokens/s, MFU {s['mfu']:.1%}")
    if "decode" in result:
        d = result["decode"]
        print(
            f"decode        batch {d['batch']}: {d['tokens_per_s']:.4g} tokens/s, "
            f"{d['fraction_of_roofline']:.1%} of the HBM roofline"
        )
    for name, p in result.get("ppo", {}).items():
        split = ", ".join(f"{k} {v:.3g} s" for k, v in p["seconds"].items())
        print(f"PPO ({name}, {p['params'] / 1e6:.0f}M) {split}; generation {p['generation_share']:.0%}")
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()

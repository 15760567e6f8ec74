"""K samples per prompt: one prefill shared by the K samples against the prompts repeated K times.

    python benchmarks/samples_per_prompt.py                  # GPT-2-shaped random model, ~20M parameters
    python benchmarks/samples_per_prompt.py --batch=8 --prompt=256 --k=4 --new=32

Three calls of ``sampling.generate`` on the same prompts, timed after a warm-up and taking turns
(``timing.best_interleaved``): K = 1; ``samples_per_prompt=K`` (each prompt prefilled once, its cache rows
copied for its K samples); the prompts repeated K times by hand (each copy prefilled). Each is timed twice:
with one new token (the prefill, which dominates) and with ``--new`` tokens. The last line printed is a JSON
object with the seconds and the ratios to K = 1.
"""

import argparse
import json

import flax.linen as nn
import jax
import numpy as np
from sampling import gpt2_shaped
from timing import best_interleaved

from instructjax import sampling
from instructjax.model import Transformer, count_params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = gpt2_shaped(args.d_model, args.n_layers)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"])
    prompt = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(prompt)
    repeated, repeated_mask = np.repeat(prompt, args.k, axis=0), np.repeat(mask, args.k, axis=0)

    def run(tokens, token_mask, new, k=1):
        def go():
            out = sampling.generate(
                params, cfg, tokens, token_mask, jax.random.key(0), max_new_tokens=new, eos_id=-1, samples_per_prompt=k
            )
            jax.block_until_ready(out)

        return go

    result = {"device": jax.devices()[0].device_kind, "params": count_params(params), **vars(args)}
    for label, new in (("prefill", 1), ("generate", args.new)):
        runs = {
            "k1": run(prompt, mask, new),
            "shared": run(prompt, mask, new, args.k),
            "repeated": run(repeated, repeated_mask, new),
        }
        seconds = best_interleaved(runs, args.repeats)
        result[label] = {name: round(s, 4) for name, s in seconds.items()}
        result[label]["shared_over_k1"] = round(seconds["shared"] / seconds["k1"], 2)
        result[label]["repeated_over_k1"] = round(seconds["repeated"] / seconds["k1"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""instructjax's sampler against Tunix's (google-tunix, the JAX post-training library), the same weights in both.

    pip install -e '.[compare]'                        # google-tunix: an optional dependency
    python benchmarks/tunix_compare.py                 # Llama-shaped ~21M model, batch 8, 128 + 128 tokens
    python benchmarks/tunix_compare.py --batch=16 --new=256 --repeats=5

One Llama-shaped model (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head; vocabulary 32,000) is
initialised here and its weights copied into Tunix's ``models.llama3`` module, so both frameworks run the same
function: the script first checks that their logits agree (``logits_max_abs_diff``) and that greedy decoding
gives the same tokens (``greedy_token_agreement``: the fraction of response positions where they match).
Then each decodes ``--new`` tokens greedily after ``--batch`` prompts of ``--prompt`` tokens (no early stop:
the EOS is an id outside the vocabulary), taking turns (``timing.best_interleaved``), the best of ``--repeats``.

What each timing holds: instructjax's ``sampling.generate`` on token arrays; Tunix's ``Sampler.__call__``,
whose interface is text, with a tokenizer here that reads and writes token ids as decimal strings (so its
time includes that string round trip of ``--batch`` × (prompt + new) ids on the host; not timed apart).

Tunix's RoPE (``llama3.model.apply_rope``, version 0.1.7) uses its default base of 1,000,000, not the
``rope_theta`` of its config, so the model here has ``rope_theta`` = 1e6 on both sides. The last line
printed is a JSON object with tokens/s of each and their ratio.
"""

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from timing import best_interleaved

from instructjax import sampling
from instructjax.model import ModelConfig, Transformer, count_params

try:
    from flax import nnx
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.llama3 import model as tunix_llama3
except ImportError as e:  # an optional dependency: say how to get it
    raise SystemExit(f"benchmarks/tunix_compare.py needs google-tunix: pip install -e '.[compare]' ({e})") from e

NEVER = -7  # the EOS id: outside the vocabulary, so no row stops early


def model_cfg(vocab: int, d_model: int, n_layers: int) -> ModelConfig:
    """A Llama-shaped config both frameworks can express (head_dim 32, 2 query heads per kv head)."""
    return ModelConfig.from_dict(
        dict(
            vocab_size=vocab,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=d_model // 32,
            n_kv_heads=d_model // 64,
            d_ff=int(d_model * 8 / 3) // 16 * 16,
            max_len=4096,
            positions="rope",
            rope_theta=1e6,
            norm="rmsnorm",
            norm_eps=1e-5,
            mlp="swiglu",
            use_bias=False,
            tie_embeddings=False,
        )
    )


def tunix_model(cfg: ModelConfig, params: dict) -> nnx.Module:
    """Tunix's Llama 3 module holding ``params`` (instructjax's tree): every weight copied, none left at init."""
    tcfg = tunix_llama3.ModelConfig(
        num_layers=cfg.n_layers,
        vocab_size=cfg.vocab_size,
        embed_dim=cfg.d_model,
        hidden_dim=cfg.d_ff,
        num_heads=cfg.n_heads,
        head_dim=cfg.dim_per_head,
        num_kv_heads=cfg.num_kv_heads,
        rope_theta=int(cfg.rope_theta),
        norm_eps=cfg.norm_eps,
    )
    model = tunix_llama3.Llama3(tcfg, rngs=nnx.Rngs(0))
    copied = {
        "embedder.input_embedding": params["embed"]["embedding"],
        "final_norm.w": params["final_norm"]["scale"],
        "lm_head.w": params["lm_head"]["kernel"],
    }
    for i in range(cfg.n_layers):
        ours, theirs = params[f"layers_{i}"], f"layers.{i}."
        copied |= {
            theirs + "input_layernorm.w": ours["attn_norm"]["scale"],
            theirs + "post_attention_layernorm.w": ours["mlp_norm"]["scale"],
            **{theirs + f"attn.{t}_proj.w": ours["attn"][t]["kernel"] for t in "qkvo"},
            theirs + "mlp.gate_proj.kernel": ours["mlp"]["wi_gate"]["kernel"],
            theirs + "mlp.up_proj.kernel": ours["mlp"]["wi_up"]["kernel"],
            theirs + "mlp.down_proj.kernel": ours["mlp"]["wo"]["kernel"],
        }
    state = nnx.state(model, nnx.Param)
    flat = {".".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}
    if set(flat) != set(copied):
        only_theirs, only_ours = set(flat) - set(copied), set(copied) - set(flat)
        raise ValueError(f"weight names differ: Tunix only {only_theirs}, instructjax only {only_ours}")
    for name, variable in flat.items():
        if variable.get_value().shape != copied[name].shape:
            raise ValueError(f"{name}: Tunix {variable.get_value().shape}, ours {copied[name].shape}")
        variable.set_value(jnp.asarray(copied[name]))
    nnx.update(model, state)
    return model


class IdTokenizer:
    """Tunix's sampler takes text: here a text is token ids written as decimal numbers."""

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int], **_) -> str:
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self) -> int:
        return 0  # 0 (falsy): Tunix prepends no BOS

    def eos_id(self) -> int:
        return NEVER

    def pad_id(self) -> int:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = model_cfg(args.vocab, args.d_model, args.layers)
    ours = Transformer(cfg)
    params = nn.meta.unbox(ours.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"])
    theirs = tunix_model(cfg, params)
    rs = np.random.RandomState(0)
    prompt = rs.randint(3, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)  # 0 is Tunix's pad
    mask = np.ones_like(prompt)

    # ---------------------------------------------------------------- the same function on both sides
    positions = jnp.broadcast_to(jnp.arange(args.prompt), prompt.shape)
    causal = jnp.tril(jnp.ones((args.prompt, args.prompt), jnp.bool_))[None].repeat(args.batch, 0)
    their_logits, _ = theirs(jnp.asarray(prompt), positions, None, causal)
    our_logits = ours.apply({"params": params}, prompt, mask)
    logits_diff = float(jnp.abs(their_logits - our_logits).max())

    # ---------------------------------------------------------------- the samplers
    cache = tunix_sampler.CacheConfig(
        cache_size=args.prompt + args.new,
        num_layers=cfg.n_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.dim_per_head,
    )
    tunix_sample = tunix_sampler.Sampler(theirs, IdTokenizer(), cache)
    texts = [IdTokenizer().decode(row) for row in prompt]
    out = {}

    def run_ours():
        gen = sampling.generate(
            params, cfg, prompt, mask, jax.random.key(0), max_new_tokens=args.new, eos_id=NEVER, temperature=0.0
        )
        out["ours"] = np.asarray(gen.tokens)

    def run_tunix():
        result = tunix_sample(
            texts,
            max_generation_steps=args.new,
            max_prompt_length=args.prompt,
            temperature=0.0,
            eos_tokens=[NEVER],
            pad_output=True,
        )
        out["tunix"] = np.stack([np.asarray(t)[: args.new] for t in result.tokens])

    seconds = best_interleaved({"instructjax": run_ours, "tunix": run_tunix}, args.repeats)
    agreement = float((out["ours"] == out["tunix"]).mean())
    tokens = args.batch * args.new
    print(
        json.dumps(
            {
                "device": jax.devices()[0].device_kind,
                "params": count_params(params),
                "batch": args.batch,
                "prompt": args.prompt,
                "new": args.new,
                "logits_max_abs_diff": logits_diff,
                "greedy_token_agreement": agreement,
                "seconds": seconds,
                "tokens_per_s": {k: tokens / s for k, s in seconds.items()},
                "instructjax_over_tunix": seconds["tunix"] / seconds["instructjax"],
            }
        )
    )


if __name__ == "__main__":
    main()

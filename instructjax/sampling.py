"""Jitted autoregressive sampling over the explicit KV cache.

``generate`` is one ``jax.jit`` program per (batch size, prompt bucket, max_new_tokens, top_k,
model config): a single prefill of the left-padded prompts, then a ``lax.while_loop`` of one-token
decode steps that exits as soon as every row has emitted EOS. Temperature, top-p, the EOS id and the
RNG are traced arguments, so changing them never recompiles. The cache is created inside the program
and carried by the loop, so XLA updates it in place (no copy per step).

Prompt lengths are rounded up to a few buckets (``pad_prompts``) so that a PPO run compiles a
handful of programs, not one per batch.

Log-probs. For each generated token we return its log-probability under the distribution it was
drawn from: ``log_softmax(filter(logits / T))`` with top-k / top-p filtering. With ``T = 1`` and no
filtering (the paper's PPO sampling) this is exactly the policy's log-prob. Greedy decoding
(``T = 0``) reports the unfiltered ``log_softmax(logits)`` (the model's own log-prob of the argmax).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from instructjax.model import ModelConfig, Transformer, init_cache

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


class Generation(NamedTuple):
    """What ``generate`` returns; N = max_new_tokens.

    tokens:   [B, N] int32   generated tokens; ``pad_id`` after a row's EOS
    logprobs: [B, N] float32 log-prob of each token under the sampling distribution (0 after EOS)
    mask:     [B, N] int32   1 for response tokens up to and including EOS
    steps:    []     int32   decode steps the loop ran (< N when every row stopped early)
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    steps: jax.Array


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket >= n; an error when n exceeds the largest."""
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"prompt of {n} tokens is longer than the largest bucket {max(buckets)}")


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int, buckets: Sequence[int] = DEFAULT_BUCKETS
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to the bucket of the longest: ``(tokens [B, P], mask [B, P])``."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError(f"empty prompt at index {[len(p) for p in prompts].index(0)}: every prompt needs a token")
    width = bucket_length(max(len(p) for p in prompts), buckets)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return tokens, mask


def _top_p_filter(scaled_bv: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the smallest set of tokens whose probability mass reaches ``top_p`` (nucleus sampling)."""
    sorted_bv = jnp.sort(scaled_bv, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_bv, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    kept = jnp.where(mass_before < top_p, sorted_bv, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(scaled_bv < threshold, -jnp.inf, scaled_bv)


def _inverse_cdf_sample(key: jax.Array, scaled_bv: jax.Array, block: int = 256) -> tuple[jax.Array, jax.Array]:
    """Exact draw from ``softmax(scaled_bv)`` with one uniform per row; returns the tokens and the
    rows' log-normalisers ``logsumexp(scaled_bv)``, which the block masses already hold (a second
    pass over the logits for the log-prob cost 0.6 ms of a 16 x 50257 decode step on CPU).

    ``jax.random.categorical`` adds Gumbel noise to every logit: B x V random numbers per step, the
    largest cost of a decode step on CPU for a 50k vocabulary. Here one uniform ``u`` per row is
    located in the cumulative distribution in two levels: among the masses of blocks of ``block``
    tokens, then within the one block it falls in. Only the block masses and that block are
    cumulated: a cumulative sum over all 16 x 50257 weights alone took 3.7 ms on CPU, and the whole
    draw 6.9 ms against 2.1 ms now (docs/benchmarks.md).

    The draw never lands on a zero-weight (filtered) token: ``u`` falls strictly inside a block of
    positive mass and, within it, at the first token whose cumulative weight exceeds the rest of
    ``u``, which therefore has positive weight. Float rounding at the edges (``u`` rounding up to the
    total, or past the block's own sum) is clamped to the last positive-mass block and token.
    """
    batch, vocab = scaled_bv.shape
    n_blocks = -(-vocab // block)
    top = jnp.max(scaled_bv, axis=-1, keepdims=True)
    weights = jnp.exp(scaled_bv - top)  # filtered tokens -> 0
    weights = jnp.pad(weights, ((0, 0), (0, n_blocks * block - vocab))).reshape(batch, n_blocks, block)
    block_mass = jnp.sum(weights, axis=-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    u = jax.random.uniform(key, (batch, 1)) * block_cdf[:, -1:]
    last_block = jnp.max(jnp.where(block_mass > 0, jnp.arange(n_blocks), 0), axis=-1)
    block_idx = jnp.minimum(jnp.sum(block_cdf <= u, axis=-1), last_block)
    mass_before = jnp.take_along_axis(block_cdf - block_mass, block_idx[:, None], axis=-1)
    block_weights = jnp.take_along_axis(weights, block_idx[:, None, None], axis=1)[:, 0]
    rest = jnp.maximum(u - mass_before, 0.0)
    last_token = jnp.max(jnp.where(block_weights > 0, jnp.arange(block), 0), axis=-1)
    within_idx = jnp.minimum(jnp.sum(jnp.cumsum(block_weights, axis=-1) <= rest, axis=-1), last_token)
    return block_idx * block + within_idx, top[:, 0] + jnp.log(block_cdf[:, -1])


def _argmax(x_bv: jax.Array) -> jax.Array:
    """``jnp.argmax`` over the last axis (the first index of the maximum) as two plain reductions: XLA:CPU's
    variadic arg-reduction took 2.0 ms over 16 x 50257 logits, a max and a min 1.1 ms. A row of NaNs,
    which matches nothing, gives the last index rather than one past the vocabulary."""
    top = jnp.max(x_bv, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x_bv.shape, x_bv.ndim - 1)
    last = x_bv.shape[-1] - 1
    return jnp.min(jnp.where(x_bv == top, index, last), axis=-1)


def _logprob_of(logits_bv: jax.Array, token_b: jax.Array, log_normaliser_b: jax.Array | None = None) -> jax.Array:
    """``log softmax(logits)[token]``; ``log_normaliser_b`` is ``logsumexp(logits)`` when already known."""
    chosen = jnp.take_along_axis(logits_bv, token_b[:, None], axis=-1)[:, 0]
    return chosen - (jax.nn.logsumexp(logits_bv, axis=-1) if log_normaliser_b is None else log_normaliser_b)


def sample_token(
    logits_bv: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One token per row and its log-prob (see the module docstring). ``temperature == 0`` is greedy;
    ``top_k == 0`` and ``top_p >= 1`` switch those filters off. ``lax.cond`` runs only the branch
    needed (greedy or sampled; nucleus filtering only when on)."""
    logits_bv = logits_bv.astype(jnp.float32)

    def greedy(logits):
        token = _argmax(logits)
        return token, _logprob_of(logits, token)

    def sampled(logits):
        scaled = logits / temperature
        if top_k > 0:
            kth_largest = jax.lax.top_k(scaled, top_k)[0][:, -1:]
            scaled = jnp.where(scaled < kth_largest, -jnp.inf, scaled)
        scaled = jax.lax.cond(top_p < 1.0, _top_p_filter, lambda s, _: s, scaled, top_p)
        token, log_normaliser = _inverse_cdf_sample(key, scaled)
        token = token.astype(jnp.int32)
        return token, _logprob_of(scaled, token, log_normaliser)

    return jax.lax.cond(temperature <= 0, greedy, sampled, logits_bv)


def _decode_loop(step_fn, last_logits, carry, rng, temperature, top_k, top_p, eos_id, pad_id, max_new_tokens):
    """The shared while_loop: sample from ``last_logits``, record, then ``step_fn`` for the next logits."""
    batch = last_logits.shape[0]
    init = dict(
        t=jnp.zeros((), jnp.int32),
        last_logits=last_logits,
        carry=carry,
        rng=rng,
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
        mask=jnp.zeros((batch, max_new_tokens), jnp.int32),
        done=jnp.zeros((batch,), jnp.bool_),
    )

    def cond(s):
        return (s["t"] < max_new_tokens) & ~jnp.all(s["done"])

    def body(s):
        rng, key = jax.random.split(s["rng"])
        token, logprob = sample_token(s["last_logits"], key, temperature, top_k, top_p)
        live = ~s["done"]
        token = jnp.where(live, token, pad_id)
        update = lambda buf, col: jax.lax.dynamic_update_slice(buf, col[:, None], (0, s["t"]))  # noqa: E731
        out = dict(
            t=s["t"] + 1,
            rng=rng,
            tokens=update(s["tokens"], token),
            logprobs=update(s["logprobs"], jnp.where(live, logprob, 0.0)),
            mask=update(s["mask"], live.astype(jnp.int32)),
            done=s["done"] | (token == eos_id),
        )
        out["last_logits"], out["carry"] = step_fn(s["carry"], token, s["t"])
        return out

    final = jax.lax.while_loop(cond, body, init)
    return Generation(final["tokens"], final["logprobs"], final["mask"], final["t"])


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k"))
def _generate_cached(
    params, prompt_bt, prompt_mask_bt, rng, temperature, top_p, eos_id, pad_id, *, cfg, max_new_tokens, top_k
):
    model = Transformer(cfg)
    batch, prompt_len = prompt_bt.shape
    cache = init_cache(cfg, batch, prompt_len + max_new_tokens)
    logits, cache = model.apply({"params": params}, prompt_bt, prompt_mask_bt, cache=cache)  # prefill

    def step(cache, token_b, t):
        logits, cache = model.apply({"params": params}, token_b[:, None], cache=cache)
        return logits[:, -1], cache

    return _decode_loop(step, logits[:, -1], cache, rng, temperature, top_k, top_p, eos_id, pad_id, max_new_tokens)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k"))
def _generate_recompute(
    params, prompt_bt, prompt_mask_bt, rng, temperature, top_p, eos_id, pad_id, *, cfg, max_new_tokens, top_k
):
    model = Transformer(cfg)
    batch, prompt_len = prompt_bt.shape
    buffer = jnp.concatenate([prompt_bt, jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], axis=1)
    buffer_mask = jnp.concatenate([prompt_mask_bt, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
    logits = model.apply({"params": params}, prompt_bt, prompt_mask_bt)

    def step(carry, token_b, t):
        buffer, buffer_mask = carry
        buffer = jax.lax.dynamic_update_slice(buffer, token_b[:, None], (0, prompt_len + t))
        buffer_mask = jax.lax.dynamic_update_slice(buffer_mask, jnp.ones((batch, 1), jnp.int32), (0, prompt_len + t))
        logits = model.apply({"params": params}, buffer, buffer_mask)  # the whole sequence, every step
        return jax.lax.dynamic_index_in_dim(logits, prompt_len + t, axis=1, keepdims=False), (buffer, buffer_mask)

    carry = (buffer, buffer_mask)
    return _decode_loop(step, logits[:, -1], carry, rng, temperature, top_k, top_p, eos_id, pad_id, max_new_tokens)


def generate(
    params: Any,
    cfg: ModelConfig,
    prompt_bt: Any,
    prompt_mask_bt: Any,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
) -> Generation:
    """Sample up to ``max_new_tokens`` tokens after each left-padded prompt (``pad_prompts``).

    Runs wherever its inputs live: under ``sharding.use(mesh, rules)`` with sharded params and a
    batch from ``sharding.to_global`` it runs sharded (batch over data/fsdp, heads over tensor).
    ``use_cache=False`` recomputes the full forward every step: the reference the cache is tested
    against and the baseline of ``benchmarks/sampling.py``.
    """
    if cfg.head != "lm":
        raise ValueError(f"generate needs a language-model head, got model.head={cfg.head!r}")
    if cfg.positions == "learned":  # positions past the learned table would silently clamp
        # Real lengths when the mask is on the host; the padded width (an upper bound) otherwise.
        longest = (
            int(prompt_mask_bt.sum(axis=1).max()) if isinstance(prompt_mask_bt, np.ndarray) else prompt_bt.shape[1]
        )
        if longest + max_new_tokens > cfg.max_len:
            raise ValueError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds model.max_len={cfg.max_len}"
            )
    fn = _generate_cached if use_cache else _generate_recompute
    scalars = [jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32)]
    scalars += [jnp.asarray(eos_id, jnp.int32), jnp.asarray(pad_id, jnp.int32)]
    return fn(params, prompt_bt, prompt_mask_bt, rng, *scalars, cfg=cfg, max_new_tokens=max_new_tokens, top_k=top_k)


def trace_generate(
    params: Any,
    cfg: ModelConfig,
    prompt_bt: jax.ShapeDtypeStruct,
    prompt_mask_bt: jax.ShapeDtypeStruct,
    rng: jax.ShapeDtypeStruct,
    *,
    max_new_tokens: int,
    top_k: int = 0,
    use_cache: bool = True,
    scalar_sharding: Any = None,
) -> jax.stages.Traced:
    """The program ``generate`` runs, traced for abstract inputs (``jax.ShapeDtypeStruct``s with shardings) and
    ready to ``.lower().compile()`` ahead of time (``aot.py``). Temperature, top-p and the EOS/PAD ids are traced
    scalars in ``generate``, so they are abstract here too, with ``scalar_sharding`` (replicated on the mesh)."""
    fn = _generate_cached if use_cache else _generate_recompute
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=scalar_sharding)  # noqa: E731
    scalars = [scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.int32)]
    return fn.trace(
        params, prompt_bt, prompt_mask_bt, rng, *scalars, cfg=cfg, max_new_tokens=max_new_tokens, top_k=top_k
    )

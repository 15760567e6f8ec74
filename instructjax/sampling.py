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

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from instructjax.kv_cache import grow_cache, init_cache, repeat_cache
from instructjax.model import ModelConfig, Transformer, unembedding

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


VOCAB_BLOCK = 256  # the sampler's block of tokens: the vocabulary is drawn from in two levels, blocks then tokens


def _top_p_threshold(scaled_vb: jax.Array, top_p: jax.Array) -> jax.Array:
    """The smallest logit [B] of each row's nucleus: the fewest most likely tokens whose probability
    mass reaches ``top_p``. Tokens below it are filtered out (nucleus sampling)."""
    sorted_vb = jnp.sort(scaled_vb, axis=0)[::-1]
    probs = jax.nn.softmax(sorted_vb, axis=0)
    mass_before = jnp.cumsum(probs, axis=0) - probs  # mass of strictly more likely tokens
    return jnp.min(jnp.where(mass_before < top_p, sorted_vb, jnp.inf), axis=0)


def _draw(
    key: jax.Array, scaled_vb: jax.Array, greedy: jax.Array, vocab_size: int, block: int = VOCAB_BLOCK
) -> tuple[jax.Array, jax.Array]:
    """One token [B] per row (column ``b``) of ``scaled_vb`` [V', B], the vocabulary first, and its
    log-prob ``log_softmax(scaled_vb)[token]``: an exact draw from the softmax, or its argmax (the
    first index of the maximum) where ``greedy``. V' is ``vocab_size`` or that rounded up to a multiple
    of ``block``; rows from ``vocab_size`` on are padding: never drawn, whatever they hold
    (``generate``'s head gives them 0).

    ``jax.random.categorical`` adds Gumbel noise to every logit: B x V random numbers per step, the
    largest cost of a decode step on CPU for a 50k vocabulary. Here one uniform ``u`` per row is
    located in the cumulative distribution in two levels: among the masses of blocks of ``block``
    tokens, then within the one block it falls in. Only the block masses and that block are
    cumulated: a cumulative sum over all B x V weights was most of the draw's time on CPU
    (docs/benchmarks.md). With the vocabulary first the blocks
    are a free reshape, and the one block needed is re-read from the logits (``exp`` of block x B
    values) instead of writing all the weights. The argmax comes from the same passes: the block
    maxima give the maximum (the softmax's shift) and the block holding it. So a decode step reads
    the logits twice, whether sampled or greedy.

    The draw never lands on a zero-weight (filtered) token: ``u`` falls strictly inside a block of
    positive mass and, within it, at the first token whose cumulative weight exceeds the rest of
    ``u``, which therefore has positive weight. Float rounding at the edges (``u`` rounding up to the
    total, or past the block's own sum) is clamped to the last positive-mass block and token.
    """
    n_blocks, tail = -(-vocab_size // block), vocab_size % block
    if extra := n_blocks * block - scaled_vb.shape[0]:  # an unpadded vocabulary (generate's head is padded)
        scaled_vb = jnp.pad(scaled_vb, ((0, extra), (0, 0)))
    batch = scaled_vb.shape[1]
    blocks = scaled_vb.reshape(n_blocks, block, batch)
    block_max = jnp.max(blocks, axis=1)  # [n_blocks, B]
    if tail:  # the last block holds padding: its maximum and mass from its real tokens only
        tail_vb = scaled_vb[vocab_size - tail : vocab_size]
        block_max = block_max.at[-1].set(jnp.max(tail_vb, axis=0))
    top = jnp.max(block_max, axis=0)
    block_mass = jnp.sum(jnp.exp(blocks - top), axis=1)  # filtered (-inf) tokens weigh 0
    if tail:
        block_mass = block_mass.at[-1].set(jnp.sum(jnp.exp(tail_vb - top), axis=0))
    block_cdf = jnp.cumsum(block_mass, axis=0)
    block_iota = jnp.arange(n_blocks)[:, None]
    u = jax.random.uniform(key, (batch,)) * block_cdf[-1]
    last_block = jnp.max(jnp.where(block_mass > 0, block_iota, 0), axis=0)
    drawn_block = jnp.minimum(jnp.sum(block_cdf <= u, axis=0), last_block)
    top_block = jnp.min(jnp.where(block_max == top, block_iota, n_blocks - 1), axis=0)
    block_idx = jnp.where(greedy, top_block, drawn_block)

    rows = block_idx * block + jnp.arange(block)[:, None]  # [block, B]: the tokens of the block chosen
    picked = jnp.take_along_axis(scaled_vb, rows, axis=0)
    real = rows < vocab_size
    weights = jnp.where(real, jnp.exp(picked - top), 0.0)
    mass_before = jnp.take_along_axis(block_cdf - block_mass, block_idx[None], axis=0)[0]
    rest = jnp.maximum(u - mass_before, 0.0)
    token_iota = jnp.arange(block)[:, None]
    last_token = jnp.max(jnp.where(weights > 0, token_iota, 0), axis=0)
    drawn = jnp.minimum(jnp.sum(jnp.cumsum(weights, axis=0) <= rest, axis=0), last_token)
    # A row of NaNs matches no maximum: its argmax is the last real token, as for jnp.argmax's range.
    top_token = jnp.min(jnp.where(real & (picked == top), token_iota, block - 1), axis=0)
    within = jnp.where(greedy, top_token, drawn)
    token = jnp.minimum(block_idx * block + within, vocab_size - 1).astype(jnp.int32)
    chosen = jnp.take_along_axis(picked, within[None], axis=0)[0]
    return token, chosen - (top + jnp.log(block_cdf[-1]))


def inverse_temperature(temperature: jax.Array) -> jax.Array:
    """``1 / T``, and 1 for greedy decoding (``T <= 0``): the factor of ``sample_token``'s logits."""
    return jnp.where(temperature > 0, 1.0 / jnp.maximum(temperature, 1e-30), 1.0)


def sample_token(
    scaled_vb: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array, vocab_size: int
) -> tuple[jax.Array, jax.Array]:
    """One token per row and its log-prob (see the module docstring) from ``scaled_vb`` [V', B]: the
    logits times ``inverse_temperature(temperature)``, the vocabulary first (rows from ``vocab_size``
    on are padding), which is the layout and the scaling of ``generate``'s head (``_head_vd``).

    ``temperature <= 0`` is greedy; ``top_k == 0`` and ``top_p >= 1`` switch those filters off. The
    temperature is folded into the head's input, the draw and the argmax share their passes
    (``_draw``), and the ``lax.cond`` around filtering returns only the token and its log-prob, so an
    unfiltered step writes no scaled or filtered copy of the logits: such copies (the division by T, and
    a nucleus ``lax.cond`` that returned the logits unchanged when off) and a ``lax.cond`` between greedy
    and sampled were a visible part of a CPU decode step's profile (docs/benchmarks.md)."""
    greedy = temperature <= 0

    def filtered(scaled):
        real = scaled[:vocab_size]
        floor = jnp.full(scaled.shape[1:], -jnp.inf, scaled.dtype)
        if top_k > 0:
            floor = jax.lax.top_k(real.T, top_k)[0][:, -1]  # the k-th largest
        real = jnp.where(real < floor, -jnp.inf, real)
        floor = jax.lax.cond(top_p < 1.0, _top_p_threshold, lambda s, _: floor, real, top_p)
        return _draw(key, jnp.where(real < floor, -jnp.inf, real), greedy, vocab_size)

    use_filters = ~greedy if top_k > 0 else ~greedy & (top_p < 1.0)
    return jax.lax.cond(use_filters, filtered, lambda s: _draw(key, s, greedy, vocab_size), scaled_vb)


DECODE_SEGMENTS = 4


def _segment_ends(max_new_tokens: int) -> list[int]:
    """The steps after which the cached decode loop stops to grow its cache: ``DECODE_SEGMENTS``
    equal segments. A step's attention reads every slot of the cache, filled or not, and the cache
    reads are a large share of a CPU decode step, so a cache sized to each segment's end reads
    P + N·5/8 slots per step on average instead of P + N; four segments decode faster than one
    (docs/benchmarks.md). Each segment is its own while_loop in the one compiled program."""
    return sorted({-(-max_new_tokens * (i + 1) // DECODE_SEGMENTS) for i in range(DECODE_SEGMENTS)})


def kv_slots_per_step(prompt_len: int, max_new_tokens: int) -> float:
    """The cache slots a decode step of ``generate`` reads, averaged over its ``max_new_tokens`` steps: every
    slot of the cache as sized for the step's segment (``_segment_ends``), filled or not. A roofline's KV-cache
    bytes per step are this × 2 (K and V) × layers × rows × kv heads × head dim × bytes per element."""
    ends = _segment_ends(max_new_tokens)
    starts = [0] + ends[:-1]
    return sum((end - start) * (prompt_len + end) for start, end in zip(starts, ends, strict=True)) / max_new_tokens


def _decode_loop(
    step_fn, last_logits, carry, rng, temperature, top_k, top_p, eos_id, pad_id, max_new_tokens, vocab, grow=None
):
    """The shared while_loop: sample from ``last_logits`` [V', B] (scaled, see ``sample_token``), record,
    then ``step_fn`` for the next logits. With ``grow(carry, end)`` it runs in ``_segment_ends``
    segments and calls ``grow`` before each segment after the first, to make room up to step ``end``."""
    batch = last_logits.shape[1]
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

    def cond(s, end):
        return (s["t"] < end) & ~jnp.all(s["done"])

    def body(s):
        rng, key = jax.random.split(s["rng"])
        token, logprob = sample_token(s["last_logits"], key, temperature, top_k, top_p, vocab)
        live = ~s["done"]
        token = jnp.where(live, token, pad_id)
        update = lambda buf, col: jax.lax.dynamic_update_slice(buf, col[:, None], (0, s["t"]))
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

    final = init
    for i, end in enumerate(_segment_ends(max_new_tokens) if grow else [max_new_tokens]):
        if i:  # after an early exit (every row done) the later loops run no step
            final = dict(final, carry=grow(final["carry"], end))
        final = jax.lax.while_loop(functools.partial(cond, end=end), body, final)
    return Generation(final["tokens"], final["logprobs"], final["mask"], final["t"])


def _head_vd(params: Any, cfg: ModelConfig) -> jax.Array:
    """The output projection as [V', D] in the compute dtype, its vocabulary padded with zero rows to a
    multiple of ``VOCAB_BLOCK``: built once per ``generate`` call, outside the decode loop.

    Decoding computes the logits vocabulary-first, ``head_vd @ hidden_bd.T`` -> [V', B], rather than the
    model's [B, V]: the same dot (the tied [V, D] embedding, contracted over D), but on CPU the faster
    layout for the head, the largest op of a decode step (docs/benchmarks.md); and the sampler's blocks
    are a free reshape of it (``_draw``)."""
    head_vd = unembedding(params, cfg).astype(jnp.dtype(cfg.dtype))
    return jnp.pad(head_vd, ((0, -cfg.vocab_size % VOCAB_BLOCK), (0, 0)))


def _scaled_logits(head_vd: jax.Array, hidden_bd: jax.Array, inverse_t: jax.Array) -> jax.Array:
    """float32 logits / T [V', B] of the last hidden states; ``1 / T`` scales the [B, D] input, not the output."""
    hidden_bd = (hidden_bd.astype(jnp.float32) * inverse_t).astype(head_vd.dtype)
    return jnp.einsum("vd,bd->vb", head_vd, hidden_bd).astype(jnp.float32)


def unrolled_layers(params: Any, cfg: ModelConfig) -> tuple[Any, ModelConfig]:
    """A scanned model's params (every layer stacked under ``layers``) as ``layers_0 .. layers_{L-1}``, with the
    config that reads them (no scan, no remat): the same function, unrolled.

    Why decoding unrolls: a scanned model's decode step slices each layer's cache out of the stacked one and
    writes it back, and XLA:CPU copies the whole stacked cache to do it, so the step grew with the cache:
    19M GPT-2 shape, 16 rows, 128 + 256 tokens, machine G: 31.4 ms a step scanned, 11.8 ms unrolled
    (docs/benchmarks.md, PPO-ptx at a real shape). The slices are taken once per ``generate`` call, inside its
    program, before the decode loop: a copy of the layer weights for the call's duration."""
    if not cfg.scan_layers:
        return params, cfg
    unrolled = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.n_layers):
        unrolled[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return unrolled, dataclasses.replace(cfg, scan_layers=False, remat="none")


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k", "samples_per_prompt"))
def _generate_cached(
    params,
    prompt_bt,
    prompt_mask_bt,
    rng,
    temperature,
    top_p,
    eos_id,
    pad_id,
    *,
    cfg,
    max_new_tokens,
    top_k,
    samples_per_prompt=1,
):
    params, cfg = unrolled_layers(params, cfg)
    model = Transformer(cfg)
    batch, prompt_len = prompt_bt.shape
    cache = init_cache(cfg, batch, prompt_len + _segment_ends(max_new_tokens)[0])  # grown per segment
    head_vd, inverse_t = _head_vd(params, cfg), inverse_temperature(temperature)
    # Prefill; only the last prompt position needs logits (the head over every position is P times
    # the work, and the head is the largest matmul of the model).
    hidden, cache = model.apply({"params": params}, prompt_bt, prompt_mask_bt, cache=cache, return_hidden=True)
    if samples_per_prompt > 1:  # each prompt prefilled once; its rows of the cache copied for its samples
        cache = repeat_cache(cfg, cache, samples_per_prompt)
        hidden = jnp.repeat(hidden[:, -1:], samples_per_prompt, axis=0)

    def step(cache, token_b, t):
        hidden, cache = model.apply({"params": params}, token_b[:, None], cache=cache, return_hidden=True)
        return _scaled_logits(head_vd, hidden[:, -1], inverse_t), cache

    last_logits = _scaled_logits(head_vd, hidden[:, -1], inverse_t)
    args = (temperature, top_k, top_p, eos_id, pad_id, max_new_tokens, cfg.vocab_size)

    def grow(cache, end):
        return grow_cache(cfg, cache, prompt_len + end)

    return _decode_loop(step, last_logits, cache, rng, *args, grow=grow)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k", "samples_per_prompt"))
def _generate_recompute(
    params,
    prompt_bt,
    prompt_mask_bt,
    rng,
    temperature,
    top_p,
    eos_id,
    pad_id,
    *,
    cfg,
    max_new_tokens,
    top_k,
    samples_per_prompt=1,
):
    model = Transformer(cfg)
    prompt_bt = jnp.repeat(prompt_bt, samples_per_prompt, axis=0)  # the reference path: no sharing
    prompt_mask_bt = jnp.repeat(prompt_mask_bt, samples_per_prompt, axis=0)
    batch, prompt_len = prompt_bt.shape
    buffer = jnp.concatenate([prompt_bt, jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], axis=1)
    buffer_mask = jnp.concatenate([prompt_mask_bt, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
    logits = model.apply({"params": params}, prompt_bt, prompt_mask_bt)
    inverse_t = inverse_temperature(temperature)

    def step(carry, token_b, t):
        buffer, buffer_mask = carry
        buffer = jax.lax.dynamic_update_slice(buffer, token_b[:, None], (0, prompt_len + t))
        buffer_mask = jax.lax.dynamic_update_slice(buffer_mask, jnp.ones((batch, 1), jnp.int32), (0, prompt_len + t))
        logits = model.apply({"params": params}, buffer, buffer_mask)  # the whole sequence, every step
        logits_bv = jax.lax.dynamic_index_in_dim(logits, prompt_len + t, axis=1, keepdims=False)
        return logits_bv.T * inverse_t, (buffer, buffer_mask)

    carry = (buffer, buffer_mask)
    args = (temperature, top_k, top_p, eos_id, pad_id, max_new_tokens, cfg.vocab_size)
    return _decode_loop(step, logits[:, -1].T * inverse_t, carry, rng, *args)


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
    samples_per_prompt: int = 1,
) -> Generation:
    """Sample up to ``max_new_tokens`` tokens after each left-padded prompt (``pad_prompts``).

    ``samples_per_prompt`` = K draws K samples of every prompt in one call: rows i·K .. i·K + K - 1 of the
    output are prompt i's. The prompt is prefilled once and its cache rows copied for its K samples, so
    the prefill costs what it does for K = 1 (the decode steps run B·K rows).

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
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt={samples_per_prompt} must be >= 1")
    fn = _generate_cached if use_cache else _generate_recompute
    scalars = [jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32)]
    scalars += [jnp.asarray(eos_id, jnp.int32), jnp.asarray(pad_id, jnp.int32)]
    static = dict(cfg=cfg, max_new_tokens=max_new_tokens, top_k=top_k, samples_per_prompt=samples_per_prompt)
    return fn(params, prompt_bt, prompt_mask_bt, rng, *scalars, **static)


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
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=scalar_sharding)
    scalars = [scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.int32)]
    return fn.trace(
        params, prompt_bt, prompt_mask_bt, rng, *scalars, cfg=cfg, max_new_tokens=max_new_tokens, top_k=top_k
    )

"""generate(): cache == recompute, one compile per bucket, EOS handling, filters, sharded == 1 device."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_model import make_cfg, mesh_for

from instructjax import sampling, sharding
from instructjax.model import Transformer

PROMPTS = [[5, 9, 13, 2, 7, 7, 30, 4, 11], [17, 3], [8, 8, 21, 40, 2], [99]]


def params_for(cfg, seed=0):
    return nn.unbox(Transformer(cfg).init(jax.random.key(seed), np.zeros((1, 4), np.int32))["params"])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny_llama"])
def test_cached_decoding_equals_full_recompute(preset):
    cfg = make_cfg(preset)
    params = params_for(cfg)
    tokens, mask = sampling.pad_prompts(PROMPTS, pad_id=0, buckets=(16,))
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=12, eos_id=1, temperature=temperature)
        cached = sampling.generate(params, cfg, tokens, mask, jax.random.key(3), **kw)
        recomputed = sampling.generate(params, cfg, tokens, mask, jax.random.key(3), use_cache=False, **kw)
        np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
        np.testing.assert_array_equal(cached.mask, recomputed.mask)
        np.testing.assert_allclose(cached.logprobs, recomputed.logprobs, atol=1e-5, rtol=0)
    # The log-probs are those of the sampling distribution, softmax(logits / T) (the model's own when
    # greedy): check against one full forward over prompt + response.
    for temperature in (0.0, 0.7):
        out = sampling.generate(
            params, cfg, tokens, mask, jax.random.key(0), max_new_tokens=12, eos_id=1, temperature=temperature
        )
        full_tokens = np.concatenate([tokens, np.asarray(out.tokens)], axis=1)
        full_mask = np.concatenate([mask, np.asarray(out.mask)], axis=1)
        logits = Transformer(cfg).apply({"params": params}, full_tokens, full_mask)
        logp = jax.nn.log_softmax(logits[:, tokens.shape[1] - 1 : -1] / (temperature or 1.0))
        expected = np.take_along_axis(np.asarray(logp), np.asarray(out.tokens)[..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(np.asarray(out.logprobs), expected * np.asarray(out.mask), atol=1e-5)
        assert np.all(np.asarray(out.logprobs) <= 0)


@pytest.mark.slow
def test_compiles_once_per_bucket():
    cfg = make_cfg("tiny", max_len=96)  # a config no other test uses: a fresh jit cache entry
    params = params_for(cfg)
    before = sampling._generate_cached._cache_size()
    rng = np.random.RandomState(0)
    for call in range(4):
        prompts = [list(rng.randint(2, 500, rng.randint(1, 17))) for _ in range(4)]
        tokens, mask = sampling.pad_prompts(prompts, pad_id=0, buckets=(16, 32))
        assert tokens.shape == (4, 16)
        sampling.generate(
            params,
            cfg,
            tokens,
            mask,
            jax.random.key(call),
            max_new_tokens=8,
            eos_id=1,
            temperature=[0.0, 0.7, 1.0, 1.3][call],
            top_p=[1.0, 0.9, 0.5, 1.0][call],
        )
    assert sampling._generate_cached._cache_size() == before + 1
    tokens, mask = sampling.pad_prompts([list(range(2, 22))], pad_id=0, buckets=(16, 32))  # the next bucket
    sampling.generate(params, cfg, tokens, mask, jax.random.key(0), max_new_tokens=8, eos_id=1)
    assert sampling._generate_cached._cache_size() == before + 2


@pytest.mark.slow
def test_eos_stops_a_row_and_masks_the_rest():
    cfg = make_cfg("tiny")
    params = params_for(cfg)
    tokens, mask = sampling.pad_prompts(PROMPTS, pad_id=0)
    free = sampling.generate(
        params, cfg, tokens, mask, jax.random.key(0), max_new_tokens=10, eos_id=-1, temperature=0.0
    )
    assert np.asarray(free.mask).all()  # no EOS possible: every row runs to max_new_tokens
    eos = int(free.tokens[0, 2])  # make row 0's third greedy token the EOS
    out = sampling.generate(
        params, cfg, tokens, mask, jax.random.key(0), max_new_tokens=10, eos_id=eos, pad_id=0, temperature=0.0
    )
    out_tokens, out_mask = np.asarray(out.tokens), np.asarray(out.mask)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(np.asarray(free.tokens[row]) == eos)
        stop = hits[0] + 1 if hits.size else 10
        np.testing.assert_array_equal(out_tokens[row, :stop], np.asarray(free.tokens[row, :stop]))
        assert out_mask[row, :stop].all() and not out_mask[row, stop:].any()
        assert (out_tokens[row, stop:] == 0).all() and (np.asarray(out.logprobs[row, stop:]) == 0).all()


def test_all_rows_done_exits_early():
    cfg = make_cfg("tiny")
    params = params_for(cfg)
    # A zero final-norm scale makes every position's hidden state the norm's bias: one greedy token
    # for every row and step. Making it the EOS stops every row after its first token.
    params["final_norm"]["scale"] = np.zeros_like(params["final_norm"]["scale"])
    params["final_norm"]["bias"] = np.asarray(jax.random.normal(jax.random.key(1), (cfg.d_model,)))
    tokens, mask = sampling.pad_prompts(PROMPTS, pad_id=0)
    kw = dict(max_new_tokens=100, temperature=0.0)
    free = sampling.generate(params, cfg, tokens, mask, jax.random.key(0), eos_id=-1, **kw)
    assert int(free.steps) == 100
    eos = int(free.tokens[0, 0])
    out = sampling.generate(params, cfg, tokens, mask, jax.random.key(0), eos_id=eos, **kw)
    assert int(out.steps) == 1
    assert np.asarray(out.mask).sum() == len(PROMPTS) and (np.asarray(out.tokens[:, 0]) == eos).all()


@pytest.mark.slow
def test_filters_top_k_and_top_p():
    cfg = make_cfg("tiny")
    params = params_for(cfg)
    tokens, mask = sampling.pad_prompts(PROMPTS, pad_id=0)
    kw = dict(max_new_tokens=8, eos_id=-1)
    greedy = sampling.generate(params, cfg, tokens, mask, jax.random.key(0), temperature=0.0, **kw)
    top1 = sampling.generate(params, cfg, tokens, mask, jax.random.key(1), temperature=1.0, top_k=1, **kw)
    tiny_p = sampling.generate(params, cfg, tokens, mask, jax.random.key(2), temperature=1.0, top_p=1e-6, **kw)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_array_equal(tiny_p.tokens, greedy.tokens)
    np.testing.assert_allclose(top1.logprobs, 0.0, atol=1e-6)  # the only token left has probability 1
    a = sampling.generate(params, cfg, tokens, mask, jax.random.key(5), temperature=1.0, top_k=5, **kw)
    b = sampling.generate(params, cfg, tokens, mask, jax.random.key(5), temperature=1.0, top_k=5, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)  # reproducible from the seed
    c = sampling.generate(params, cfg, tokens, mask, jax.random.key(6), temperature=1.0, **kw)
    assert not np.array_equal(a.tokens, c.tokens)


def test_inverse_cdf_draw_follows_the_softmax_and_skips_filtered_tokens():
    # 700 tokens: two full blocks of 256 and a padded third; filtered (-inf) runs at the start, across
    # the first block edge and at the end. 40,000 columns of the same logits give 40,000 independent
    # draws. Padding rows past the vocabulary hold 50.0, above every real logit: never drawn.
    rng = np.random.RandomState(0)
    logits = (2.0 * rng.randn(700)).astype(np.float32)
    logits[:10] = logits[250:262] = logits[690:] = -np.inf
    draws = 40_000
    padded = np.concatenate([logits, np.full(68, 50.0, np.float32)])[:, None]  # [V', 1]
    draw = jax.jit(sampling._draw, static_argnums=3)
    tokens, logprobs = draw(jax.random.key(3), np.tile(padded, (1, draws)), np.False_, 700)
    tokens = np.asarray(tokens)
    probs = np.exp(logits - logits.max())
    log_norm = np.log(probs.sum()) + logits.max()
    np.testing.assert_allclose(np.asarray(logprobs), logits[tokens] - log_norm, rtol=1e-5, atol=1e-5)
    probs /= probs.sum()
    assert (probs[tokens] > 0).all()  # never a filtered token, nor padding
    counts = np.bincount(tokens, minlength=700)
    kept = probs > 0
    chi2 = (((counts - draws * probs) ** 2)[kept] / (draws * probs[kept])).sum()
    dof = kept.sum() - 1  # chi-square mean dof, sd sqrt(2 dof); a block off by one gives thousands
    assert chi2 < dof + 6 * np.sqrt(2 * dof), chi2
    # The same logits unpadded, and greedy: the argmax and its log-prob.
    token, logprob = draw(jax.random.key(0), logits[:, None], np.True_, 700)
    assert int(token[0]) == int(np.argmax(logits))
    np.testing.assert_allclose(float(logprob[0]), logits.max() - log_norm, rtol=1e-5)
    # A degenerate row: one token left (top-k 1) always gives that token, with log-prob 0.
    one = np.full((700, 4), -np.inf, np.float32)  # [V, B]: the sampler's layout
    one[511] = 3.0
    token, lp = sampling.sample_token(one, jax.random.key(0), np.float32(1.0), 0, np.float32(1.0), 700)
    assert (np.asarray(token) == 511).all() and np.allclose(np.asarray(lp), 0.0)


def test_greedy_draw_is_the_first_maximum_of_the_real_tokens():
    # Ties go to the first index, as jnp.argmax's; a maximum in the tail block and in padding rows
    # (which must be ignored); all-negative rows, where padding's 0 would win if it counted; NaN rows.
    vocab = 600  # blocks of 256: two full and a tail of 88
    rng = np.random.RandomState(1)
    logits = rng.randn(768, 6).astype(np.float32) - 30.0
    logits[vocab:] = 0.0  # zero padding rows, as generate's head gives them
    logits[[40, 300], 0] = 5.0  # a tie across blocks
    logits[590, 1] = 7.0  # the maximum in the tail block
    logits[[3, 4], 2] = 2.0  # a tie within a block
    logits[:, 4] = np.nan
    draw = jax.jit(sampling._draw, static_argnums=3)
    token, _ = draw(jax.random.key(0), logits, np.True_, vocab)
    expected = np.argmax(logits[:vocab], axis=0)
    expected[4] = vocab - 1  # a row of NaNs: the last real token
    np.testing.assert_array_equal(np.asarray(token), expected)
    assert expected[:4].tolist() == [40, 590, 3, expected[3]]


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([[0.15, 0.5, 0.05, 0.3]], np.float32)).T  # [V, B]
    threshold = np.asarray(sampling._top_p_threshold(logits, np.float32(0.7)))
    np.testing.assert_allclose(threshold, np.log([0.3]), rtol=1e-6)  # 0.5 + 0.3 reaches 0.7: the nucleus ends at 0.3


@pytest.mark.slow
def test_sharded_sampling_equals_one_device():
    cfg = make_cfg("tiny_llama")
    prompts = PROMPTS * 2  # batch 8 divides data x fsdp = 4
    tokens, mask = sampling.pad_prompts(prompts, pad_id=0)
    outs = []
    for shape in (None, (2, 2, 2)):
        mesh, rules = mesh_for(shape), sharding.DEFAULT_RULES
        params, _ = sharding.init_params(Transformer(cfg), jax.random.key(0), tokens[:1], mesh, rules)
        with sharding.use(mesh, rules):
            batch = sharding.to_global((tokens, mask), mesh, rules)
            out = sampling.generate(params, cfg, *batch, jax.random.key(7), max_new_tokens=10, eos_id=1)
            outs.append(jax.tree.map(np.asarray, out))
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny_llama_scan"])
def test_samples_per_prompt_share_one_prefill_and_equal_the_repeated_prompts(preset):
    cfg = make_cfg("tiny_llama", scan_layers=True) if preset == "tiny_llama_scan" else make_cfg(preset)
    params = params_for(cfg)
    tokens, mask = sampling.pad_prompts(PROMPTS, pad_id=0, buckets=(16,))
    kw = dict(max_new_tokens=8, eos_id=1)
    # Greedy: each prompt's K rows are its K = 1 output (the cache rows are copies of one prefill).
    one = sampling.generate(params, cfg, tokens, mask, jax.random.key(0), temperature=0.0, **kw)
    four = sampling.generate(params, cfg, tokens, mask, jax.random.key(0), temperature=0.0, samples_per_prompt=4, **kw)
    np.testing.assert_array_equal(four.tokens, np.repeat(np.asarray(one.tokens), 4, axis=0))
    np.testing.assert_allclose(four.logprobs, np.repeat(np.asarray(one.logprobs), 4, axis=0), atol=1e-5, rtol=0)
    # Sampled: the same draws as the prompts repeated by hand and decoded without a cache, and K different rows.
    shared = sampling.generate(params, cfg, tokens, mask, jax.random.key(5), samples_per_prompt=3, **kw)
    repeated = sampling.generate(
        params, cfg, np.repeat(tokens, 3, axis=0), np.repeat(mask, 3, axis=0), jax.random.key(5), use_cache=False, **kw
    )
    np.testing.assert_array_equal(shared.tokens, repeated.tokens)
    np.testing.assert_allclose(shared.logprobs, repeated.logprobs, atol=1e-5, rtol=0)
    rows = np.asarray(shared.tokens).reshape(len(PROMPTS), 3, -1)
    assert any(len({r.tobytes() for r in group}) > 1 for group in rows)
    with pytest.raises(ValueError, match="samples_per_prompt=0 must be >= 1"):
        sampling.generate(params, cfg, tokens, mask, jax.random.key(0), samples_per_prompt=0, **kw)


@pytest.mark.slow
def test_bf16_generation_runs_and_mostly_agrees_with_f32():
    cfg = make_cfg("tiny")
    params = params_for(cfg)
    tokens, mask = sampling.pad_prompts(PROMPTS, pad_id=0)
    kw = dict(max_new_tokens=6, eos_id=-1, temperature=0.0)
    f32 = sampling.generate(params, cfg, tokens, mask, jax.random.key(0), **kw)
    bf16 = sampling.generate(params, dataclasses.replace(cfg, dtype="bfloat16"), tokens, mask, jax.random.key(0), **kw)
    assert np.asarray(bf16.mask).all() and np.isfinite(np.asarray(bf16.logprobs)).all()
    assert (np.asarray(bf16.tokens[:, 0]) == np.asarray(f32.tokens[:, 0])).mean() >= 0.5


def test_prompt_validation():
    with pytest.raises(ValueError, match="empty prompt at index 1"):
        sampling.pad_prompts([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="longer than the largest bucket 16"):
        sampling.pad_prompts([list(range(17))], pad_id=0, buckets=(16,))
    assert sampling.bucket_length(17, (16, 32)) == 32
    cfg = make_cfg("tiny")
    tokens, mask = sampling.pad_prompts([list(range(2, 122))], pad_id=0, buckets=(128,))
    with pytest.raises(ValueError, match=r"prompt \(120 tokens\) \+ max_new_tokens \(16\) exceeds model.max_len=128"):
        sampling.generate(params_for(cfg), cfg, tokens, mask, jax.random.key(0), max_new_tokens=16, eos_id=1)


def test_scanned_model_decodes_unrolled_with_the_same_tokens():
    """``generate`` unrolls a scanned model's layers for decoding (``sampling.unrolled_layers``): the same
    weights stacked or unrolled give the same greedy tokens and log-probs."""
    cfg = make_cfg("tiny_llama")
    unrolled = params_for(cfg)
    stacked = {k: v for k, v in unrolled.items() if not k.startswith("layers_")}
    stacked["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *[unrolled[f"layers_{i}"] for i in range(cfg.n_layers)])
    scanned_cfg = dataclasses.replace(cfg, scan_layers=True, remat="full")
    back, back_cfg = sampling.unrolled_layers(stacked, scanned_cfg)
    assert not back_cfg.scan_layers and back_cfg.remat == "none" and set(back) == set(unrolled)
    tokens, mask = sampling.pad_prompts(PROMPTS, pad_id=0, buckets=(16,))
    kw = dict(max_new_tokens=8, eos_id=-1, temperature=0.0)
    a = sampling.generate(unrolled, cfg, tokens, mask, jax.random.key(0), **kw)
    b = sampling.generate(stacked, scanned_cfg, tokens, mask, jax.random.key(0), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)

"""The pure losses refuse shapes that would broadcast, and a NaN or inf in padding does not reach them.

Every mismatch below used to give a number (a [1,K,K] pair mask: an accuracy above 1; a [B,1] mask: a mean over B
instead of the tokens) or a non-descriptive error; every NaN below used to make the loss NaN. Tiny arrays only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax import losses, rollout

B, N, K, T, V, D = 3, 5, 4, 6, 11, 8
NAN_INF = (np.nan, np.inf, -np.inf)


def prefix_mask(lengths, n=N):
    return (np.arange(n)[None] < np.asarray(lengths)[:, None]).astype(np.float32)


def rand(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def poison(x, mask, seed=1):
    """``x`` with NaN, inf and -inf spread over the entries where ``mask`` is 0."""
    out = np.array(x, np.float32, copy=True)
    where = np.argwhere(np.asarray(mask) == 0)
    assert len(where), "the test needs masked-out entries"
    for i, idx in enumerate(np.random.RandomState(seed).permutation(where)):
        out[tuple(idx)] = NAN_INF[i % 3]
    return jnp.asarray(out)


def pair_mask():
    """Prompt 0: completions 0 > 1 > 2, slot 3 padded; prompt 1: 1 > 0 and 3 > 2 only; prompt 2 padded."""
    m = np.zeros((B, K, K), np.int32)
    m[0, 0, 1] = m[0, 0, 2] = m[0, 1, 2] = 1
    m[1, 1, 0] = m[1, 3, 2] = 1
    return m


# ------------------------------------------------------------------------------------------- shape checks
MASK = prefix_mask([5, 2, 3])
SHAPE_CASES = {
    "ranking pair mask [1,K,K]": (
        lambda: losses.ranking_loss(rand(B, K), np.ones((1, K, K))),
        "ranking_loss: B is 3 in rewards_bk but 1 in pair_mask_bkk",
    ),
    "ranking pair mask not square": (
        lambda: losses.ranking_loss(rand(B, K), np.ones((B, K, K - 1))),
        "ranking_loss: K is 4 in rewards_bk but 3 in pair_mask_bkk",
    ),
    "ranking rewards [B,K,1]": (
        lambda: losses.ranking_loss(rand(B, K, 1), pair_mask()),
        r"ranking_loss: rewards_bk has 3 axes, expected 2; expected rewards_bk \[B,K\], pair_mask_bkk \[B,K,K\]",
    ),
    "ppo mask [B,1]": (
        lambda: losses.ppo_policy_loss(rand(B, N), rand(B, N), rand(B, N), np.ones((B, 1)), 0.2),
        r"ppo_policy_loss: N is 5 in logprobs_bn but 1 in mask_bn; .* got .*mask_bn \(3, 1\)",
    ),
    "ppo old log-probs [1,N]": (
        lambda: losses.ppo_policy_loss(rand(B, N), rand(1, N), rand(B, N), MASK, 0.2),
        "ppo_policy_loss: B is 3 in logprobs_bn but 1 in old_logprobs_bn",
    ),
    "ppo advantages [B]": (
        lambda: losses.ppo_policy_loss(rand(B, N), rand(B, N), rand(B), MASK, 0.2),
        "ppo_policy_loss: advantages_bn has 1 axes, expected 2",
    ),
    "value returns [B,1]": (
        lambda: losses.value_loss(rand(B, N), rand(B, N), rand(B, 1), MASK, 0.2),
        "value_loss: N is 5 in values_bn but 1 in returns_bn",
    ),
    "value mask [B,1], no clipping": (
        lambda: losses.value_loss(rand(B, N), rand(B, N), rand(B, N), np.ones((B, 1)), 0.0),
        "value_loss: N is 5 in values_bn but 1 in mask_bn",
    ),
    "masked_mean mask [B,1]": (
        lambda: losses.masked_mean(rand(B, N), np.ones((B, 1))),
        r"masked_mean: B is 5 in x but 1 in mask; expected x \[A,B\], mask \[A,B\], got x \(3, 5\), mask \(3, 1\)",
    ),
    "masked_mean mask of another rank": (
        lambda: losses.masked_mean(rand(B, N), np.ones(N)),
        "masked_mean: mask has 1 axes, expected 2",
    ),
    "token_logprobs logits [1,T,V]": (
        lambda: losses.token_logprobs(rand(1, T, V), np.zeros((B, T), np.int32)),
        "token_logprobs: B is 1 in logits_btv but 3 in tokens_bt",
    ),
    "lm_loss mask [1,T]": (
        lambda: losses.lm_loss(rand(B, T, V), np.zeros((B, T), np.int32), np.ones((1, T))),
        "lm_loss: B is 3 in logits_btv but 1 in loss_mask_bt",
    ),
    "lm_loss tokens [B,T-1]": (
        lambda: losses.lm_loss(rand(B, T, V), np.zeros((B, T - 1), np.int32), np.ones((B, T))),
        "lm_loss: T is 6 in logits_btv but 5 in tokens_bt",
    ),
    "fused_lm_loss mask [B,1]": (
        lambda: losses.fused_lm_loss(rand(B, T, D), rand(V, D), np.zeros((B, T), np.int32), np.ones((B, 1))),
        "fused_lm_loss: T is 6 in hidden_btd but 1 in loss_mask_bt",
    ),
    "fused_lm_loss unembed [D,V]": (
        lambda: losses.fused_lm_loss(rand(B, T, D), rand(D, V), np.zeros((B, T), np.int32), np.ones((B, T))),
        "fused_lm_loss: D is 8 in hidden_btd but 11 in unembed_vd",
    ),
    "kl_shaped_rewards scores [B,1]": (
        lambda: rollout.kl_shaped_rewards(rand(B, N), rand(B, N), rand(B, 1), MASK, 0.05),
        r"kl_shaped_rewards: scores_b has 2 axes, expected 1; .* got .*scores_b \(3, 1\)",
    ),
    "kl_shaped_rewards scores [B+1]": (
        lambda: rollout.kl_shaped_rewards(rand(B, N), rand(B, N), rand(B + 1), MASK, 0.05),
        "kl_shaped_rewards: B is 3 in logprobs_bn but 4 in scores_b",
    ),
    "kl_shaped_rewards mask [B,1]": (
        lambda: rollout.kl_shaped_rewards(rand(B, N), rand(B, N), rand(B), np.ones((B, 1)), 0.05),
        "kl_shaped_rewards: N is 5 in logprobs_bn but 1 in mask_bn",
    ),
    "kl_shaped_rewards ref log-probs [N]": (
        lambda: rollout.kl_shaped_rewards(rand(B, N), rand(N), rand(B), MASK, 0.05),
        "kl_shaped_rewards: ref_logprobs_bn has 1 axes, expected 2",
    ),
    "kl_shaped_rewards beta [B]": (
        lambda: rollout.kl_shaped_rewards(rand(B, N), rand(B, N), rand(B), MASK, np.full(B, 0.05)),
        "kl_shaped_rewards: beta has 1 axes, expected 0",
    ),
    "gae values [B,1]": (
        lambda: rollout.gae(rand(B, N), rand(B, 1), MASK),
        "gae: N is 5 in rewards_bn but 1 in values_bn",
    ),
    "whiten mask [1,N]": (
        lambda: rollout.whiten(rand(B, N), np.ones((1, N))),
        "whiten: B is 3 in x but 1 in mask",
    ),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_mismatched_shapes_raise_a_value_error_naming_function_arguments_and_shapes(case):
    call, message = SHAPE_CASES[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_shape_checks_run_at_trace_time_under_jit():
    """Static shapes: the check fires while tracing (``eval_shape`` runs nothing), and a good call compiles."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    ppo = jax.jit(losses.ppo_policy_loss, static_argnums=4)
    with pytest.raises(ValueError, match="ppo_policy_loss: N is 5 in logprobs_bn but 1 in mask_bn"):
        jax.eval_shape(ppo, f32(B, N), f32(B, N), f32(B, N), f32(B, 1), 0.2)
    with pytest.raises(ValueError, match="ranking_loss: B is 3 in rewards_bk but 1 in pair_mask_bkk"):
        jax.jit(losses.ranking_loss).lower(f32(B, K), f32(1, K, K))
    with pytest.raises(ValueError, match="kl_shaped_rewards: scores_b has 2 axes"):
        jax.jit(rollout.kl_shaped_rewards).lower(f32(B, N), f32(B, N), f32(B, 1), f32(B, N), f32())
    loss, _ = ppo(rand(B, N), rand(B, N), rand(B, N), MASK, 0.2)
    assert np.isfinite(float(loss))


# ------------------------------------------------------------------------------------ NaN in padding
def test_ranking_loss_ignores_nan_and_inf_rewards_of_padded_completions_and_prompts():
    rewards, mask = rand(B, K), pair_mask()
    bad = rewards.copy()
    bad[0, 3] = np.nan  # prompt 0's padded completion slot
    bad[2] = [np.nan, np.inf, -np.inf, np.nan]  # a padded prompt
    want_loss, want_acc = losses.ranking_loss(rewards, mask)
    for fn in (losses.ranking_loss, jax.jit(losses.ranking_loss)):
        loss, acc = fn(jnp.asarray(bad), mask)
        assert np.isfinite(float(loss)) and np.isfinite(float(acc))
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
        assert float(acc) == float(want_acc)
    # the NumPy reference: prompts 0 (3 pairs) and 1 (2 pairs), each a mean over its pairs
    terms = [
        [np.log1p(np.exp(-(rewards[b, i] - rewards[b, j]))) for i, j in zip(*np.nonzero(mask[b]), strict=True)]
        for b in (0, 1)
    ]
    np.testing.assert_allclose(float(want_loss), np.mean([np.mean(t) for t in terms]), rtol=1e-6)


def test_ppo_policy_loss_ignores_nan_and_inf_in_masked_positions():
    mask = prefix_mask([5, 2, 3])
    logp, old, adv = rand(B, N, seed=1), rand(B, N, seed=2), rand(B, N, seed=3)
    want_loss, want_stats = losses.ppo_policy_loss(logp, old, adv, mask, 0.2)
    bad = (poison(logp, mask, 1), poison(old, mask, 2), poison(adv, mask, 3))
    for fn in (losses.ppo_policy_loss, jax.jit(losses.ppo_policy_loss, static_argnums=4)):
        loss, stats = fn(*bad, mask, 0.2)
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
        for k, v in want_stats.items():
            np.testing.assert_allclose(float(stats[k]), float(v), rtol=1e-6, err_msg=k)
    # the token mean (not a mean over rows): Σ m·max(...) / Σ m
    ratio = np.exp(logp - old)
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    np.testing.assert_allclose(float(want_loss), (per_token * mask).sum() / mask.sum(), rtol=1e-5)


@pytest.mark.parametrize("clip", [0.2, 0.0])
def test_value_loss_ignores_nan_and_inf_in_masked_positions(clip):
    mask = prefix_mask([1, 5, 4])
    values, old, returns = rand(B, N, seed=4), rand(B, N, seed=5), rand(B, N, seed=6)
    want, want_stats = losses.value_loss(values, old, returns, mask, clip)
    bad = (poison(values, mask, 4), poison(old, mask, 5), poison(returns, mask, 6))
    got, stats = losses.value_loss(*bad, mask, clip)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    assert float(stats["value_clip_frac"]) == float(want_stats["value_clip_frac"])


def test_masked_mean_ignores_nan_and_inf_where_the_mask_is_zero_and_keeps_weights():
    x, mask = rand(B, N), prefix_mask([3, 0, 5])
    got = losses.masked_mean(poison(x, mask), mask)
    np.testing.assert_allclose(float(got), x[mask > 0].mean(), rtol=1e-6)
    weights = mask * np.linspace(0.5, 2.0, N, dtype=np.float32)
    got = losses.masked_mean(poison(x, weights), weights)
    np.testing.assert_allclose(float(got), (x * weights).sum() / weights.sum(), rtol=1e-6)
    assert float(losses.masked_mean(np.full((B, N), np.nan), np.zeros((B, N)))) == 0.0  # empty mask: 0


def test_lm_losses_ignore_nan_logits_and_hidden_states_that_predict_masked_tokens():
    rng = np.random.RandomState(7)
    tokens = jnp.asarray(rng.randint(0, V, (B, T)))
    mask = np.array([[0, 1, 1, 0, 1, 0], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]], np.int32)
    predicts_masked = np.concatenate([mask[:, 1:], np.zeros((B, 1), np.int32)], axis=1)  # row t predicts t+1
    logits = rand(B, T, V, seed=8)
    bad_logits = logits.copy()
    bad_logits[predicts_masked == 0] = np.nan
    want, count = losses.lm_loss(jnp.asarray(logits), tokens, jnp.asarray(mask))
    for fn in (losses.lm_loss, jax.jit(losses.lm_loss)):
        got, got_count = fn(jnp.asarray(bad_logits), tokens, jnp.asarray(mask))
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        assert float(got_count) == float(count) == mask[:, 1:].sum()

    # fused: NaN hidden rows that predict masked tokens reach neither the loss nor the gradients
    hidden, unembed = rand(B, T, D, seed=9), 0.3 * rand(V, D, seed=10)
    bad_hidden = hidden.copy()
    bad_hidden[predicts_masked == 0] = np.nan
    loss_and_grads = jax.jit(jax.value_and_grad(lambda h, w: losses.fused_lm_loss(h, w, tokens, mask, 4)[0], (0, 1)))
    want, (want_gh, want_gw) = loss_and_grads(hidden, unembed)
    got, (got_gh, got_gw) = loss_and_grads(bad_hidden, unembed)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    unfused = losses.lm_loss(jnp.asarray(hidden @ unembed.T), tokens, jnp.asarray(mask))[0]
    np.testing.assert_allclose(float(want), float(unfused), rtol=1e-5)
    assert np.isfinite(got_gh).all() and np.isfinite(got_gw).all()
    np.testing.assert_allclose(got_gh, want_gh, atol=1e-7)
    np.testing.assert_allclose(got_gw, want_gw, atol=1e-7)


def test_rollout_rewards_gae_and_whitening_ignore_nan_after_the_response():
    mask = prefix_mask([5, 2, 1])
    logp, ref, values, scores = rand(B, N, seed=11), rand(B, N, seed=12), rand(B, N, seed=13), rand(B, seed=14)
    beta = jnp.float32(0.05)
    want = rollout.kl_shaped_rewards(logp * mask, ref * mask, scores, mask, beta)
    got = rollout.kl_shaped_rewards(poison(logp, mask, 11), poison(ref, mask, 12), scores, mask, beta)
    assert np.isfinite(got).all() and np.all(np.asarray(got)[mask == 0] == 0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    adv, ret = rollout.gae(poison(want, mask, 15), poison(values, mask, 13), mask)
    want_adv, want_ret = rollout.gae(want, values * mask, mask)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-6)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-6)
    for shift in (True, False):
        got = rollout.whiten(poison(want_adv, mask, 16), mask, shift_mean=shift)
        np.testing.assert_allclose(got, rollout.whiten(want_adv, mask, shift_mean=shift), rtol=1e-6)


def test_kl_shaped_rewards_assumes_a_prefix_mask():
    """Documented, not checked (a value check under jit would need checkify): T is Σm - 1, so a mask with a
    hole puts the score before the row's last 1. Rollout masks are prefixes by construction."""
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 0, 0]], np.float32)
    rewards = np.asarray(rollout.kl_shaped_rewards(np.zeros((2, N)), np.zeros((2, N)), np.array([1.0, 2.0]), mask, 0.1))
    np.testing.assert_array_equal(rewards, [[0, 0, 1, 0, 0], [0, 2, 0, 0, 0]])
    assert "prefix mask" in rollout.kl_shaped_rewards.__doc__ and "checkify" in rollout.kl_shaped_rewards.__doc__


# ------------------------------------------------------------------------ finite inputs: the old numbers
def plain_mean(x, m):
    return (x * m).sum() / jnp.maximum(m.sum(), 1.0)


def plain_ppo(logp, old, adv, m):
    log_ratio = logp - old
    ratio = jnp.exp(log_ratio)
    unclipped, clipped = -adv * ratio, -adv * jnp.clip(ratio, 0.8, 1.2)
    return plain_mean(jnp.maximum(unclipped, clipped), m), {
        "clip_frac": plain_mean((clipped > unclipped).astype(jnp.float32), m),
        "approx_kl": plain_mean(0.5 * jnp.square(log_ratio), m),
        "ratio": plain_mean(ratio, m),
    }


def plain_whiten(x, m):
    mean = plain_mean(x, m)
    return (x - mean) * jax.lax.rsqrt(plain_mean(jnp.square(x - mean), m) + 1e-8) * m


def plain_ranking(r, pair_mask):
    m = pair_mask.astype(jnp.float32)
    diff = r[:, :, None] - r[:, None, :]
    pairs = m.sum(axis=(1, 2))
    per_prompt = -(jax.nn.log_sigmoid(diff) * m).sum(axis=(1, 2)) / jnp.maximum(pairs, 1.0)
    has = (pairs > 0).astype(jnp.float32)
    return (per_prompt * has).sum() / jnp.maximum(has.sum(), 1.0), ((diff > 0) * m).sum() / jnp.maximum(m.sum(), 1.0)


def finite_cases(seed):
    """``(name, unguarded, guarded, args)`` in the pipeline's patterns: the whitening of a 16-episode rollout
    of 16 tokens, a PPO minibatch's loss, stats and gradient, and RM gradients through a gathered reward."""
    rng = np.random.RandomState(seed)
    m = prefix_mask(rng.randint(1, 17, 16), 16)
    logp, old, adv = (rng.randn(16, 16).astype(np.float32) for _ in range(3))
    yield "whiten", plain_whiten, rollout.whiten, (adv, m)
    ppo = lambda loss: lambda lp, o, a, m: jax.value_and_grad(lambda lp: loss(lp, o, a, m), has_aux=True)(lp)
    yield "ppo", ppo(plain_ppo), ppo(lambda *a: losses.ppo_policy_loss(*a, 0.2)), (logp, old, adv, m)
    b, k, t, d = 8, 9, 32, 64
    hidden, w = rng.randn(b * k, t, d).astype(np.float32), (0.1 * rng.randn(d)).astype(np.float32)
    last = rng.randint(0, t, b * k)
    valid = np.arange(k)[None] < rng.randint(2, k + 1, b)[:, None]
    pairs = np.triu(np.ones((k, k)), 1)[None] * valid[:, :, None] * valid[:, None, :] * (rng.rand(b, k, k) > 0.15)

    def rm(loss):
        def f(w, hidden, last, pairs):
            rewards = lambda w: jnp.take_along_axis(jnp.tanh(hidden @ w), last[:, None], axis=1).reshape(b, k)
            return jax.value_and_grad(lambda w: loss(rewards(w), pairs), has_aux=True)(w)

        return f

    yield "ranking", rm(plain_ranking), rm(losses.ranking_loss), (w, hidden, last, pairs.astype(np.int32))


@pytest.mark.parametrize("seed", range(4))
def test_finite_inputs_give_the_unguarded_numbers_bit_for_bit_under_jit(seed):
    """The NaN guard must not change a finite result or gradient, not even in the last bit. On XLA CPU a select
    inside the summed expression did (XLA vectorised the reduction differently: whitening, PPO), and so did a
    select in the backward pass (the RM's gradient); each case is compared with its unguarded formula."""
    for name, plain, guarded, args in finite_cases(seed):
        want, got = jax.jit(plain)(*args), jax.jit(guarded)(*args)
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)

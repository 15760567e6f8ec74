"""Losses against NumPy references; the optimizer's schedule, decay mask and accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import load_config

from instructjax import losses, optim
from instructjax.data import formats


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_lm_loss_matches_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 7, 11).astype(np.float32)
    tokens = rng.randint(0, 11, (3, 7))
    mask = rng.randint(0, 2, (3, 7))
    loss, n = losses.lm_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
    logp = np_log_softmax(logits)
    total, count = 0.0, 0
    for b in range(3):
        for t in range(1, 7):
            if mask[b, t]:
                total -= logp[b, t - 1, tokens[b, t]]
                count += 1
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-6)
    assert int(n) == count
    lp = np.asarray(losses.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    assert lp[:, 0].tolist() == [0, 0, 0]
    np.testing.assert_allclose(lp[1, 3], logp[1, 2, tokens[1, 3]], rtol=1e-6)


def test_fused_lm_loss_equals_lm_loss_in_value_and_gradients():
    rng = np.random.RandomState(1)
    hidden = jnp.asarray(rng.randn(3, 9, 16).astype(np.float32))
    unembed = jnp.asarray(0.3 * rng.randn(50, 16).astype(np.float32))  # [V, D]
    tokens, mask = jnp.asarray(rng.randint(0, 50, (3, 9))), jnp.asarray(rng.randint(0, 2, (3, 9)))

    def reference(h, w):
        return 2.0 * losses.lm_loss(h @ w.T, tokens, mask)[0]

    # 3 rows x 8 positions: chunk 5, blocks of one position (every row in each; the first block outside the
    # scan, seven in it); chunk 10, three blocks of 3 positions, the last padded; chunk 32, one block, a scan
    # over nothing.
    for chunk in (5, 10, 32):

        def fused(h, w, chunk=chunk):
            return 2.0 * losses.fused_lm_loss(h, w, tokens, mask, chunk)[0]

        np.testing.assert_allclose(float(fused(hidden, unembed)), float(reference(hidden, unembed)), rtol=1e-6)
        for got, want in zip(
            jax.jit(jax.grad(fused, (0, 1)))(hidden, unembed), jax.grad(reference, (0, 1))(hidden, unembed), strict=True
        ):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    assert int(losses.fused_lm_loss(hidden, unembed, tokens, mask)[1]) == int(mask[:, 1:].sum())


def test_schedule_warmup_then_cosine_to_ten_percent():
    cfg = load_config("configs/sft.py").optim
    cfg.warmup_steps, cfg.lr = 10, 1.0
    schedule = optim.lr_schedule(cfg, total_steps=110)
    assert float(schedule(0)) == 0.0 and abs(float(schedule(5)) - 0.5) < 1e-6
    assert abs(float(schedule(10)) - 1.0) < 1e-6 and abs(float(schedule(60)) - 0.55) < 1e-6
    assert abs(float(schedule(110)) - 0.1) < 1e-6


def test_decay_mask_and_accumulation():
    params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,)), "scale": jnp.ones((3,))}
    assert optim.decay_mask(params) == {"kernel": True, "bias": False, "scale": False}
    cfg = load_config("configs/sft.py").optim
    cfg.grad_accum_steps, cfg.weight_decay = 2, 0.1
    tx = optim.make_optimizer(cfg, total_steps=10)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))  # first micro-batch: no update
    updates, state = tx.update(grads, state, params)
    assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
    assert isinstance(tx, optax.GradientTransformation)


def test_ranking_loss_matches_numpy_for_k_2_to_9_with_ties_and_padding():
    rng = np.random.RandomState(2)
    k_max, rows = 9, []
    for k in range(2, 10):
        order = list(rng.permutation(k))
        if k >= 4:  # a tie group in the middle: its pairs are dropped
            order = [order[0], [int(order[1]), int(order[2])], *order[3:]]
        rows.append((k, [o if isinstance(o, list) else int(o) for o in order]))
    rewards = rng.randn(len(rows), k_max).astype(np.float32)
    pair_mask = np.zeros((len(rows), k_max, k_max), np.int32)
    expected_losses, wins, total = [], 0, 0
    for b, (k, ranking) in enumerate(rows):
        pairs = formats.ranking_pairs(ranking)
        assert len(pairs) == k * (k - 1) // 2 - (1 if k >= 4 else 0)
        terms = []
        for i, j in pairs:
            pair_mask[b, i, j] = 1
            d = rewards[b, i] - rewards[b, j]
            terms.append(np.log1p(np.exp(-d)))  # -log sigmoid(d)
            wins, total = wins + (d > 0), total + 1
        expected_losses.append(np.mean(terms))
    loss, accuracy = losses.ranking_loss(jnp.asarray(rewards), jnp.asarray(pair_mask))
    np.testing.assert_allclose(float(loss), np.mean(expected_losses), atol=1e-6)
    np.testing.assert_allclose(float(accuracy), wins / total, atol=1e-6)
    padded = np.concatenate([pair_mask, np.zeros((2, k_max, k_max), np.int32)])  # empty prompts don't count
    loss2, _ = losses.ranking_loss(jnp.asarray(np.concatenate([rewards, rng.randn(2, k_max)])), jnp.asarray(padded))
    np.testing.assert_allclose(float(loss2), float(loss), atol=1e-6)

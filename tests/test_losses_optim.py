"""Losses against NumPy references; the optimizer's schedule, decay mask and accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import load_config

from instructjax import losses, optim


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

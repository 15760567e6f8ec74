"""Pure, masked loss functions. Every one states its formula; tests compare each with NumPy.

Conventions: ``logits_btv`` are next-token logits (position t predicts token t+1), masks are 0/1 of
the shapes in the names, and means are over mask entries (tokens or pairs), never over padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_btv: jax.Array, tokens_bt: jax.Array) -> jax.Array:
    """``logp[b, t] = log softmax(logits[b, t-1])[tokens[b, t]]`` for t >= 1; ``logp[:, 0] = 0``.

    Aligned with ``tokens``: entry t is the log-probability of token t given the tokens before it.
    Returns [B, T] float32.
    """
    # logit[target] - logsumexp(logits): never materialises a [B,T,V] log-softmax (V is 50k for GPT-2),
    # which made the loss the most memory-bound part of a small model's train step.
    logits_btv = logits_btv[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked - jax.nn.logsumexp(logits_btv, axis=-1), ((0, 0), (1, 0)))


def lm_loss(logits_btv: jax.Array, tokens_bt: jax.Array, loss_mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked next-token cross-entropy (SFT, pretraining, and the PPO-ptx term):

        L = -Σ_{b,t} m[b,t] · log p(x[b,t] | x[b,<t]) / Σ_{b,t} m[b,t]

    where ``m = loss_mask`` marks the tokens that are predicted (the response and its EOS for SFT;
    every token but a segment's first for pretraining). Returns ``(L, Σ m)``.
    """
    mask = loss_mask_bt.astype(jnp.float32).at[:, 0].set(0.0)  # token 0 has no prediction
    tokens = jnp.maximum(mask.sum(), 1.0)
    return -(token_logprobs(logits_btv, tokens_bt) * mask).sum() / tokens, mask.sum()

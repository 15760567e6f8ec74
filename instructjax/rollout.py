"""PPO rollouts (paper_spec §3): score sampled responses, shape per-token rewards, GAE, whitening.

A rollout batch is B left-padded prompts ``[B,P]`` with the policy's sampled responses ``[B,N]``
(``sampling.generate``: right-padded after EOS, ``response_mask`` 1 up to and including the EOS).
``score`` runs one full forward of each model over prompt ⊕ response (dropout off everywhere):

- ``logprobs``: the policy's log π(y_t | x, y_<t), recomputed by the same full forward the update
  uses, so the first update's ratio is exactly 1 (the sampler's cached log-probs are not reused);
- ``ref_logprobs``: the same under the frozen SFT reference;
- ``values``: the value model's V_t for the state before token t (its output at position t-1);
- ``scores``: the frozen RM at the EOS (``scoring.last_token``) minus its bias, replaced by
  ``missing_eos_penalty`` when the response has no EOS (N+ Detail 23; [LHP] ``penalty_reward_value``).

Then ``kl_shaped_rewards`` gives r_t = -β(log π - log π_ref) + [t = last]·score and ``gae`` the
advantages and returns with γ = 1 (the paper: no discount) and λ = 0.95 (the paper leaves λ open;
[S20], [LHP] and N+ use 0.95).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from instructjax import losses, scoring
from instructjax.model import Transformer


@struct.dataclass
class Rollout:
    prompt: jax.Array  # [B,P] left-padded
    prompt_mask: jax.Array  # [B,P]
    response: jax.Array  # [B,N] pad after EOS
    response_mask: jax.Array  # [B,N] 1 up to and including EOS
    logprobs: jax.Array  # [B,N] policy (π_old for the update)
    ref_logprobs: jax.Array  # [B,N] frozen reference
    values: jax.Array  # [B,N] value model (V_old)
    scores: jax.Array  # [B] normalised RM score, or the missing-EOS penalty
    stopped: jax.Array  # [B] the response ends with EOS
    entropy: jax.Array  # [B,N] policy entropy at each response position
    rewards: jax.Array | None = None  # [B,N] shaped per-token rewards
    advantages: jax.Array | None = None  # [B,N] whitened
    returns: jax.Array | None = None  # [B,N]


def kl_shaped_rewards(
    logprobs_bn: jax.Array, ref_logprobs_bn: jax.Array, scores_b: jax.Array, mask_bn: jax.Array, beta: jax.Array
) -> jax.Array:
    """Per-token rewards: Eq. 2 of Ouyang et al. 2022 (§3.5) with its KL penalty "at each token" and the RM
    score at the last one, as in Ziegler et al. 2019's code (``compute_rewards``):

        r_t = -β·(log π(y_t) - log π_ref(y_t)) + 1[t = T]·score

    for t up to the last response token T (the EOS, or the last token of a cut response); 0 after it.

    Shapes, checked at trace time (free under ``jit``): log-probs, reference log-probs and mask exactly [B,N],
    scores [B], β a scalar. Log-probs where the mask is 0 are selected out, so a NaN or inf there gives 0.

    The mask must be a prefix mask, each row 1s then 0s (``sampling.generate``'s: 1 up to and including the
    EOS): T is taken as Σ_t m[b,t] - 1, not searched for, so with a hole in a row's mask the score lands before
    its last 1. This is assumed, not checked: checking the mask's values under ``jit`` would need ``checkify``
    (or a host callback) around every caller.
    """
    losses.check_shapes(
        "kl_shaped_rewards",
        logprobs_bn=(logprobs_bn, "BN"),
        ref_logprobs_bn=(ref_logprobs_bn, "BN"),
        scores_b=(scores_b, "B"),
        mask_bn=(mask_bn, "BN"),
        beta=(beta, ""),
    )
    mask = mask_bn.astype(jnp.float32)
    last = jnp.maximum(mask.sum(axis=1).astype(jnp.int32) - 1, 0)
    at_last = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * (mask.sum(axis=1, keepdims=True) > 0)
    kl = jnp.where(mask != 0, -beta * (logprobs_bn - ref_logprobs_bn) * mask, 0.0)
    return kl + jnp.where(at_last != 0, at_last * scores_b[:, None], 0.0)


def gae(
    rewards_bn: jax.Array, values_bn: jax.Array, mask_bn: jax.Array, gamma: float = 1.0, lam: float = 0.95
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (as in Ziegler et al. 2019's and Huang et al. 2024's code) as a
    reverse ``lax.scan`` over tokens:

        δ_t = r_t + γ·V_{t+1} - V_t,    A_t = δ_t + γλ·A_{t+1},    R_t = A_t + V_t

    with V_{T+1} = A_{T+1} = 0 past the last response token (γ = 1: Ouyang et al. 2022 use no discount);
    A and R are 0 where the mask is 0, and a NaN or inf there in the rewards or values is selected out.
    Rewards, values and mask must all be exactly [B,N] (checked at trace time). Returns ``(advantages,
    returns)``, both [B,N].
    """
    losses.check_shapes("gae", rewards_bn=(rewards_bn, "BN"), values_bn=(values_bn, "BN"), mask_bn=(mask_bn, "BN"))
    mask = mask_bn.astype(jnp.float32)
    values = jnp.where(mask != 0, values_bn * mask, 0.0)
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))

    def step(next_adv, xs):
        r, v, v_next, m = xs
        adv = jnp.where(m != 0, (r + gamma * v_next - v + gamma * lam * next_adv) * m, 0.0)
        return adv, adv

    xs = (rewards_bn.T, values.T, next_values.T, mask.T)  # scan over the token axis, last token first
    _, adv_nb = jax.lax.scan(step, jnp.zeros(rewards_bn.shape[0], jnp.float32), xs, reverse=True)
    advantages = adv_nb.T
    return advantages, jnp.where(mask != 0, (advantages + values) * mask, 0.0)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked entries (Ziegler et al. 2019's code, ``whiten``),
    0 where the mask is 0 (a NaN or inf there is selected out); with ``shift_mean=False`` the mean is added
    back (reward whitening keeps the reward's sign). ``x`` and ``mask`` exactly [B,N]."""
    losses.check_shapes("whiten", x=(x, "BN"), mask=(mask, "BN"))
    mean = losses.masked_mean(x, mask)
    var = losses.masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask != 0, out * mask, 0.0)


def score(
    models: dict[str, Transformer],
    params: dict[str, Any],
    prompt: jax.Array,
    prompt_mask: jax.Array,
    response: jax.Array,
    response_mask: jax.Array,
    *,
    eos_id: int,
    rm_bias: float,
    missing_eos_penalty: float | None,
    temperature: float,
    minibatch_size: int,
    rm_weight: float = 1.0,
    host_scores: jax.Array | None = None,
) -> Rollout:
    """Every model's view of the sampled responses (``models``/``params`` keyed policy, ref, value, rm).

    The score (``reward_fns``): ``rm_weight`` × (the RM's score minus its bias, ``missing_eos_penalty`` for a
    response without EOS) + ``host_scores`` [B] (the reward functions' weighted sum, computed on the host).
    With ``rm_weight`` 0 the RM is not run and the score is ``host_scores`` alone (e.g. the gold score)."""
    tokens = jnp.concatenate([prompt, response], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    p = prompt.shape[1]
    # Log-probs in minibatch-sized chunks: the same shapes as the update's forward, so the first update
    # recomputes them bit for bit (another batch size may round differently), and the policy's equal the
    # reference's while their params are equal.
    b = tokens.shape[0]
    chunks = lambda x: x.reshape(b // minibatch_size, minibatch_size, *x.shape[1:])

    def logprobs_of(name):
        fn = lambda tm: scoring.response_logprobs(models[name], params[name], *tm, p, temperature)
        logp, entropy = jax.lax.map(fn, (chunks(tokens), chunks(mask)))
        return logp.reshape(b, -1), entropy.reshape(b, -1)

    logprobs, entropy = logprobs_of("policy")
    ref_logprobs, _ = logprobs_of("ref")
    values = scoring.response_values(models["value"], params["value"], tokens, mask, p)
    stopped = ((response == eos_id) & (response_mask > 0)).any(axis=1)
    scores = None
    if rm_weight:
        scores = scoring.sequence_rewards(models["rm"], params["rm"], tokens, mask) - rm_bias
        if missing_eos_penalty is not None:
            scores = jnp.where(stopped, scores, missing_eos_penalty)
        if rm_weight != 1.0:
            scores = rm_weight * scores
    if host_scores is not None:  # e.g. the gold score, which prices a missing EOS itself: no penalty on it
        scores = host_scores if scores is None else scores + host_scores
    if scores is None:
        raise ValueError("a reward with rm_weight 0 needs host_scores")
    m = response_mask.astype(jnp.float32)
    return Rollout(
        prompt=prompt,
        prompt_mask=prompt_mask,
        response=response,
        response_mask=response_mask,
        logprobs=logprobs * m,
        ref_logprobs=ref_logprobs * m,
        values=values * m,
        scores=scores,
        stopped=stopped,
        entropy=entropy * m,
    )


def finish(rollout: Rollout, beta: jax.Array, gamma: float, lam: float, whiten_rewards: bool = False) -> Rollout:
    """Add shaped rewards, advantages (whitened over the batch's response tokens) and returns."""
    mask = rollout.response_mask
    rewards = kl_shaped_rewards(rollout.logprobs, rollout.ref_logprobs, rollout.scores, mask, beta)
    if whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, rollout.values, mask, gamma, lam)
    return rollout.replace(rewards=rewards, advantages=whiten(advantages, mask), returns=returns)

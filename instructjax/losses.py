"""Pure, masked loss functions. Every one states its formula; tests compare each with NumPy.

Conventions: ``logits_btv`` are next-token logits (position t predicts token t+1), masks are 0/1 of
the shapes in the names, and means are over mask entries (tokens or pairs), never over padding.

Shapes are checked exactly (``check_shapes``): an array that would merely broadcast, a [B,1] mask against
[B,N] values or a [1,K,K] pair mask against [B,K] rewards, is a ``ValueError``, since every masked mean here
would otherwise sum or divide by the wrong number of entries. The checks read static shapes, so under ``jit``
they run once, at trace time. Masked sums are NaN-safe (``_masked_sum``): a NaN or inf in a masked-out slot
(padding) does not reach a loss's value, and for finite inputs the numbers are those of ``Σ x·m``, bit for bit.
"""

from __future__ import annotations

import functools
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from instructjax import sharding


def check_shapes(fn: str, **arrays: tuple[Any, str]) -> None:
    """Raise ``ValueError`` unless each ``name=(array, axes)`` has exactly one axis per letter of ``axes``
    (``""``: a scalar), a letter naming the same size in every array that uses it (``"BKK"``: square in K).

    No broadcasting: a size-1 axis matches only 1. Plain Python on static shapes, so free at run time under
    ``jit``. The message names ``fn``, the offending axis and arrays, and every argument's shape."""
    sizes: dict[str, tuple[int, str]] = {}  # axis letter -> (its size, the argument that set it)
    for name, (x, axes) in arrays.items():
        shape, problem = tuple(jnp.shape(x)), None
        if len(shape) != len(axes):
            problem = f"{name} has {len(shape)} axes, expected {len(axes)}"
        else:
            for axis, size in zip(axes, shape, strict=True):
                first, where = sizes.setdefault(axis, (size, name))
                if size != first:
                    problem = f"{axis} is {first} in {where} but {size} in {name}"
                    break
        if problem is None:
            continue
        expected = ", ".join(f"{n} [{','.join(a)}]" for n, (_, a) in arrays.items())
        got = ", ".join(f"{n} {tuple(jnp.shape(x))}" for n, (x, _) in arrays.items())
        raise ValueError(f"{fn}: {problem}; expected {expected}, got {got}")


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _masked_sum(x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """``Σ x·m`` over ``axis``, NaN-safe: a NaN or inf where ``m = 0`` (padding) does not reach it.

    Computed as ``(x * mask).sum(axis)``, bit for bit, wherever that is finite; where it is not (``NaN·0`` is
    NaN), as the sum of ``x·m`` over the entries with ``m ≠ 0``. Weights stay weights. The derivative is that
    of ``(x * mask).sum(axis)`` in x (the mask is data, not differentiated); only the value is guarded, so a
    non-finite entry's own derivative upstream still meets 0·NaN in the backward pass.
    """
    # Not just the selected sum: XLA on CPU vectorises (reassociates) a reduction according to its fused loop
    # body, so a select in that body changed the order of the additions, and the last bit of whitened
    # advantages and PPO losses at the shapes the pipeline uses. This way the first sum is the old one, and
    # the custom JVP keeps the backward pass the old one too (a select there changed the RM's gradients).
    fast = (x * mask).sum(axis)
    return jnp.where(jnp.isfinite(fast), fast, jnp.where(mask != 0, x * mask, 0).sum(axis))


@_masked_sum.defjvp
def _masked_sum_jvp(axis, primals, tangents):
    x, mask = primals
    return _masked_sum(x, mask, axis), (tangents[0] * mask).sum(axis)


def token_logprobs(logits_btv: jax.Array, tokens_bt: jax.Array) -> jax.Array:
    """``logp[b, t] = log softmax(logits[b, t-1])[tokens[b, t]]`` for t >= 1; ``logp[:, 0] = 0``.

    Aligned with ``tokens``: entry t is the log-probability of token t given the tokens before it.
    Returns [B, T] float32. ``logits_btv`` must be [B,T,V] for ``tokens_bt`` [B,T] (no broadcasting).
    """
    check_shapes("token_logprobs", logits_btv=(logits_btv, "BTV"), tokens_bt=(tokens_bt, "BT"))
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

    Shapes: logits [B,T,V], tokens and mask [B,T]. A NaN or inf in the logits that predict a masked token
    does not reach L (its gradient is not guarded).
    """
    check_shapes(
        "lm_loss", logits_btv=(logits_btv, "BTV"), tokens_bt=(tokens_bt, "BT"), loss_mask_bt=(loss_mask_bt, "BT")
    )
    mask = loss_mask_bt.astype(jnp.float32).at[:, 0].set(0.0)  # token 0 has no prediction
    tokens = jnp.maximum(mask.sum(), 1.0)
    total = (token_logprobs(logits_btv, tokens_bt) * mask).sum()
    # Not _masked_sum: a second sum of the log-probs would make XLA materialise them, which changed the order
    # of the first sum's additions. The NaN-safe sum is recomputed only when the plain one is not finite.
    total = jax.lax.cond(
        jnp.isfinite(total), lambda: total, lambda: _masked_sum(token_logprobs(logits_btv, tokens_bt), mask)
    )
    return -total / tokens, mask.sum()


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_lm_loss(
    hidden_btd: jax.Array, unembed_vd: jax.Array, tokens_bt: jax.Array, loss_mask_bt: jax.Array, chunk: int = 256
) -> tuple[jax.Array, jax.Array]:
    """``lm_loss(hidden @ unembed_vd.T, tokens, loss_mask)`` without ever holding the [B,T,V] logits.

    ``unembed_vd`` is the output projection as [V, D] (``model.unembedding``: a tied model's token
    embedding itself, so neither it nor its gradient is transposed). Positions are processed in blocks of
    about ``chunk`` rows per device (every row, ``chunk // rows`` positions of each, rows counted per batch
    shard under ``sharding.use``: a batch-sharded hidden stays sharded); each block's logits give its loss and,
    right away, its gradients ``dL/dlogits = (softmax - onehot) · m / Σm``, contracted into ``dL/dhidden`` and
    ``dL/dunembed`` (a custom VJP), so the backward pass recomputes nothing and the FLOPs equal the unfused loss.
    Each batch shard sums its own ``dL/dunembed`` over the blocks; they are added once, after the last block.
    Same value and gradients as ``lm_loss`` (tested). Returns ``(L, Σ m)``.

    Shapes: hidden [B,T,D], unembed [V,D], tokens and mask [B,T]. Hidden rows that predict a masked token are
    zeroed before the head, so a NaN or inf there reaches neither the loss nor any gradient.
    """
    loss, count, _ = _fused_forward(hidden_btd, unembed_vd, tokens_bt, loss_mask_bt, chunk)
    return loss, count


def _fused_forward(hidden_btd, unembed_vd, tokens_bt, loss_mask_bt, chunk):
    check_shapes(
        "fused_lm_loss",
        hidden_btd=(hidden_btd, "BTD"),
        unembed_vd=(unembed_vd, "VD"),
        tokens_bt=(tokens_bt, "BT"),
        loss_mask_bt=(loss_mask_bt, "BT"),
    )
    b, t, d = hidden_btd.shape
    # Blocks of positions with every row in each, [S, B/S, c] for S batch shards, so a batch-sharded hidden
    # stays sharded: each device takes about `chunk` of its own rows a block. Chunks of the flattened
    # [B·T] rows lay on one device each, and under FSDP XLA split their contraction over D instead and
    # all-reduced every chunk's [C, V] logits (32x the weight's bytes on 8 CPU devices, tests/test_rollout_layout.py).
    shards = sharding.batch_shards()
    shards = shards if b % shards == 0 else 1
    rows = b // shards
    n = t - 1
    n_blocks = -(-n // max(1, chunk // rows))
    c = -(-n // n_blocks)  # positions a block, spread evenly

    def blocked(x_bn):  # [B, n, ...] -> [k, S, B/S, c, ...], positions zero-padded to k·c
        x_bn = jnp.pad(x_bn, [(0, 0), (0, n_blocks * c - n)] + [(0, 0)] * (x_bn.ndim - 2))
        x = x_bn.reshape(shards, rows, n_blocks, c, *x_bn.shape[2:])
        return jnp.moveaxis(x, 2, 0)

    h = blocked(hidden_btd[:, :-1])
    targets = blocked(tokens_bt[:, 1:])
    weights = blocked(loss_mask_bt[:, 1:].astype(jnp.float32))
    count = loss_mask_bt[:, 1:].astype(jnp.float32).sum()
    scale = 1.0 / jnp.maximum(count, 1.0)
    # Every block needs the whole embedding axis of the weight: gathered once, here (scoring.token_logprobs).
    w_vd = nn.with_logical_constraint(unembed_vd.astype(hidden_btd.dtype), ("vocab", None))

    def block_terms(h_c, t_c, m_c):
        """One block's summed NLL, dL/dhidden [S,R,c,D] and each shard's own dL/dunembed [S,V,D]."""
        # Rows of weight 0 contribute 0 to all three anyway; zeroing them keeps a NaN there out of the sums.
        h_c = jnp.where(m_c[..., None] != 0, h_c, 0)
        logits = jnp.einsum("srcd,vd->srcv", h_c, w_vd, preferred_element_type=jnp.float32)
        rows_v, t_rows, m_rows = logits.reshape(-1, logits.shape[-1]), t_c.reshape(-1), m_c.reshape(-1)
        # One exp over the logits serves both the log-sum-exp and the softmax (logsumexp, then
        # exp(logits - lse), took two; the second was a fifth of the head's time on CPU).
        top = rows_v.max(axis=-1)
        unnormalised = jnp.exp(rows_v - top[:, None])
        total = unnormalised.sum(axis=-1)
        lse = top + jnp.log(total)
        picked = jnp.take_along_axis(rows_v, t_rows[:, None], axis=-1)[:, 0]
        g_rows = unnormalised * (m_rows * scale / total)[:, None]
        g_rows = g_rows.at[jnp.arange(t_rows.shape[0]), t_rows].add(-m_rows * scale)
        g_logits = g_rows.reshape(logits.shape)
        g_h = jnp.einsum("srcv,vd->srcd", g_logits.astype(w_vd.dtype), w_vd, preferred_element_type=jnp.float32)
        # dL/dunembed as [V, D] (g^T h): on CPU this contraction runs ~1.5x faster than h^T g. Kept per batch
        # shard ([S, V, D], split over S like the batch) and summed once after the loop: a [V, D] carry was
        # all-reduced in every trip (tests/test_rollout_layout.py).
        g_w = jnp.einsum("srcv,srcd->svd", g_logits, h_c.astype(jnp.float32))
        return ((lse - picked) * m_rows).sum(), g_h, nn.with_logical_constraint(g_w, ("batch", "vocab", None))

    def body(grad_svd, xs):
        nll_c, g_h, g_w = block_terms(*xs)
        return grad_svd + g_w, (nll_c, g_h)

    # The first block's dL/dunembed starts the sum: a zero [V, D] carry cost a 51 MB fill and an add.
    nll_0, g_h_0, grad_svd = block_terms(h[0], targets[0], weights[0])
    grad_svd, (nll, g_h) = jax.lax.scan(body, grad_svd, (h[1:], targets[1:], weights[1:]))
    g_h = jnp.moveaxis(jnp.concatenate([g_h_0[None], g_h]), 0, 2).reshape(b, n_blocks * c, d)
    g_hidden = jnp.pad(g_h[:, :n], ((0, 0), (0, 1), (0, 0)))
    loss = (nll_0 + nll.sum()) * scale
    return loss, count, (g_hidden.astype(hidden_btd.dtype), grad_svd.sum(0).astype(unembed_vd.dtype))


def _fused_fwd(hidden_btd, unembed_vd, tokens_bt, loss_mask_bt, chunk):
    loss, count, grads = _fused_forward(hidden_btd, unembed_vd, tokens_bt, loss_mask_bt, chunk)
    return (loss, count), (grads, tokens_bt, loss_mask_bt)


def _fused_bwd(chunk, residuals, cotangents):
    (g_hidden, g_unembed), tokens_bt, loss_mask_bt = residuals
    g_loss = cotangents[0]  # Σm is a count: no gradient flows through it
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (tokens_bt, loss_mask_bt))
    return (g_hidden * g_loss.astype(g_hidden.dtype), g_unembed * g_loss.astype(g_unembed.dtype), *zeros)


fused_lm_loss.defvjp(_fused_fwd, _fused_bwd)


def ranking_loss(rewards_bk: jax.Array, pair_mask_bkk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The reward-model loss of Ouyang et al. 2022 (Eq. 1, §3.5), all K completions of a prompt in one
    element (§3.5, footnote 5):

        L_b = -(1/P_b) Σ_{i,j} M[b,i,j] · log σ(r[b,i] - r[b,j]),   P_b = Σ_{i,j} M[b,i,j]
        L   = mean of L_b over the prompts with P_b > 0

    where ``M[b,i,j] = 1`` when completion i is ranked above j (tied and padded pairs are 0; ties are dropped
    as in App. C.2), so a prompt with K ranked completions and no ties contributes its C(K,2) pairs with weight
    1/C(K,2) (the paper's divisor; with ties we divide by the pairs kept). Returns ``(L, pairwise accuracy)``,
    the accuracy being the share of valid pairs with r_i > r_j.

    Shapes: rewards [B,K], pair mask exactly [B,K,K]. A NaN or inf reward in no valid pair (a padded
    completion slot, a padded prompt) reaches neither the loss nor the accuracy (its gradient is not guarded).
    """
    check_shapes("ranking_loss", rewards_bk=(rewards_bk, "BK"), pair_mask_bkk=(pair_mask_bkk, "BKK"))
    mask = pair_mask_bkk.astype(jnp.float32)
    diff = rewards_bk[:, :, None].astype(jnp.float32) - rewards_bk[:, None, :].astype(jnp.float32)
    pairs_b = mask.sum(axis=(1, 2))
    per_prompt = -_masked_sum(jax.nn.log_sigmoid(diff), mask, axis=(1, 2)) / jnp.maximum(pairs_b, 1.0)
    has_pairs = (pairs_b > 0).astype(jnp.float32)
    loss = (per_prompt * has_pairs).sum() / jnp.maximum(has_pairs.sum(), 1.0)
    accuracy = ((diff > 0) * mask).sum() / jnp.maximum(mask.sum(), 1.0)  # a comparison is never NaN
    return loss, accuracy


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ x·m / Σ m`` (0 when the mask is empty), ``x`` and ``mask`` of exactly one shape.

    A NaN or inf in ``x`` where m = 0 does not reach the mean (``_masked_sum``).
    """
    axes = string.ascii_uppercase[: jnp.ndim(x)]
    check_shapes("masked_mean", x=(x, axes), mask=(mask, axes))
    mask = mask.astype(jnp.float32)
    return _masked_sum(x, mask) / jnp.maximum(mask.sum(), 1.0)


def ppo_policy_loss(
    logprobs_bn: jax.Array, old_logprobs_bn: jax.Array, advantages_bn: jax.Array, mask_bn: jax.Array, clip_eps: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate (Schulman et al. 2017) as in Ziegler et al. 2019 (§2.2, their code's
    ``train_policy.py``) and Huang et al. 2024 (The N+ implementation details of RLHF with PPO, ``ppo.py``),
    with ε = 0.2 in Ouyang et al. 2022 (App. C.4); a mean over response tokens:

        ρ_t = exp(log π(y_t) - log π_old(y_t))
        L_π = Σ_t m_t · max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-ε, 1+ε)) / Σ_t m_t

    Also returns ``clip_frac`` (share of tokens where the clipped term is taken), ``approx_kl``
    (mean of ½(log ρ)², an estimate of KL(π_old ‖ π)) and ``ratio`` (mean ρ).

    Shapes: the log-probs, advantages and mask all exactly [B,N]. A NaN or inf in them where m = 0 reaches
    neither the loss nor the stats (its gradient is not guarded).
    """
    check_shapes(
        "ppo_policy_loss",
        logprobs_bn=(logprobs_bn, "BN"),
        old_logprobs_bn=(old_logprobs_bn, "BN"),
        advantages_bn=(advantages_bn, "BN"),
        mask_bn=(mask_bn, "BN"),
    )
    log_ratio = logprobs_bn - old_logprobs_bn
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages_bn * ratio
    clipped = -advantages_bn * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask_bn)
    stats = {
        "clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask_bn),
        "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), mask_bn),
        "ratio": masked_mean(ratio, mask_bn),
    }
    return loss, stats


def value_loss(
    values_bn: jax.Array, old_values_bn: jax.Array, returns_bn: jax.Array, mask_bn: jax.Array, clip: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped value loss of Ziegler et al. 2019's code (``train_policy.py``) and Huang et al. 2024
    (``ppo.py``; Ouyang et al. 2022 do not say whether they clip it), a mean over response tokens:

        V_clip = V_old + clip(V - V_old, -c, c)
        L_V = ½ · Σ_t m_t · max((V_t - R_t)², (V_clip_t - R_t)²) / Σ_t m_t

    ``clip <= 0`` gives the plain ½·mean (V - R)². Also returns ``value_clip_frac``.

    Shapes: values, old values, returns and mask all exactly [B,N]. A NaN or inf in them where m = 0 does not
    reach the loss (its gradient is not guarded).
    """
    check_shapes(
        "value_loss",
        values_bn=(values_bn, "BN"),
        old_values_bn=(old_values_bn, "BN"),
        returns_bn=(returns_bn, "BN"),
        mask_bn=(mask_bn, "BN"),
    )
    unclipped = jnp.square(values_bn - returns_bn)
    if clip <= 0:
        return 0.5 * masked_mean(unclipped, mask_bn), {"value_clip_frac": jnp.zeros(())}
    clipped_values = old_values_bn + jnp.clip(values_bn - old_values_bn, -clip, clip)
    clipped = jnp.square(clipped_values - returns_bn)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask_bn)
    return loss, {"value_clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask_bn)}

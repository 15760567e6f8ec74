"""How a model reads a sequence it did not write: the scoring primitives every later module shares.

- ``last_token``/``sequence_rewards``: a scalar-head model's reward of a sequence, read at its last real token.
  Where the reward is read, the paper leaves open (§3.5 and App. C say only that a scalar projection replaces
  the unembedding): here the **last real token** of prompt ⊕ response. Every well-formed
  sequence ends with its EOS, so that is the EOS token (Huang et al. 2024, detail 12). RM training rows are
  right-padded and PPO rollouts are a left-padded prompt followed by a right-padded response; "the last
  position whose mask is 1" finds the EOS in both layouts. A response with no EOS (cut at the length limit)
  is read at its last token; PPO replaces that score by the missing-EOS penalty.
- ``response_logprobs``/``response_values``: an LM's log-probs (and entropy) and a value model's estimates
  for the response tokens of prompt ⊕ response, one full forward each.

This module sits low in the package (it needs only the model), so the reward model
(``reward.py``), the rollouts (``rollout.py``) and evaluation (``evaluate.py``) share it without importing
each other.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from instructjax import sharding
from instructjax.model import Transformer, unembedding


def last_token(values_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """``values_bt[b, t_b]`` where ``t_b`` is the last position with ``mask_bt[b] == 1`` (position 0 if none)."""
    length = mask_bt.shape[1]
    last = length - 1 - jnp.argmax(mask_bt[:, ::-1].astype(jnp.int32), axis=1)
    last = jnp.where(mask_bt.any(axis=1), last, 0)
    return jnp.take_along_axis(values_bt, last[:, None], axis=1)[:, 0]


def sequence_rewards(
    model: Transformer,
    params: Any,
    tokens_bt: jax.Array,
    mask_bt: jax.Array,
    rngs: dict | None = None,
    right_padded: bool = False,
) -> jax.Array:
    """Raw (un-normalised) rewards [B] of right- or left-padded sequences, read at the last real token.
    ``right_padded=True`` says every row of ``mask_bt`` is 1s then 0s (the RM's batches): the attention may
    then take the fused kernel on a GPU (``Transformer.__call__``)."""
    values_bt = model.apply(
        {"params": params}, tokens_bt, mask_bt, deterministic=rngs is None, rngs=rngs, right_padded=right_padded
    )
    return last_token(values_bt, mask_bt)


def response_logprobs(
    model: Transformer, params: Any, tokens_bt: jax.Array, mask_bt: jax.Array, prompt_len: int, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """``(log π(y_t), entropy_t)`` for the response tokens (positions ``prompt_len:``) of prompt ⊕ response,
    with the logits divided by the sampling temperature, so the ratio and the KL compare the distributions the
    responses were drawn from (as Ziegler et al.'s and Huang et al. 2024's code do; the paper samples at 1).
    The LM head runs on the positions that predict the response only, a block at a time (``token_logprobs``)."""
    if prompt_len < 1:
        raise ValueError(f"prompt_len={prompt_len}: the first response token is predicted from a prompt token")
    hidden = model.apply({"params": params}, tokens_bt, mask_bt, return_hidden=True)
    # Positions prompt_len-1 .. T-2 predict y_t; the prompt's other positions never reach the head.
    return token_logprobs(
        hidden[:, prompt_len - 1 : -1], unembedding(params, model.cfg), tokens_bt[:, prompt_len:], temperature
    )


def token_logprobs(
    hidden_bnd: jax.Array, unembed_vd: jax.Array, targets_bn: jax.Array, temperature: float, block_rows: int = 256
) -> tuple[jax.Array, jax.Array]:
    """``(log p(y), H(p))`` [B,N] of ``p = softmax(hidden @ unembed_vd.T / temperature)`` without the [B,N,V]
    logits: ``max(1, block_rows // B)`` positions of every row at a time (about ``block_rows`` rows of logits per
    device at once; 256 was the fastest of 64-1,024 for the forward and the gradient at 19M on machine G)::

        z = h·Wᵀ/τ,  lse = log Σ_v exp z_v,  log p(y) = z_y - lse,  H = lse - Σ_v p_v z_v

    One exp per logit serves the log-sum-exp and the entropy. The custom VJP recomputes the logits a slice of
    the vocabulary at a time, for every position (about block_rows / 8 rows' worth of logits each), and applies
    ``∂log p(y)/∂z = onehot(y) - p`` and ``∂H/∂z = -p ⊙ (z - Σ p z)``, so neither pass keeps the logits: on CPU
    the full [B,N,V] array and its passes cost more than the head's matmul at long responses
    (docs/benchmarks.md, "How each phase grows"); the backward pass does one head matmul more than autodiff.
    Same values and gradients as the plain log-softmax (tests/test_ppo.py). The batch axis stays whole in
    every block of both passes, so a batch-sharded ``hidden_bnd`` stays sharded, and the [V,D] weight gradient
    is all-reduced once, as autodiff's is (tests/test_rollout_layout.py); an FSDP-sharded weight is gathered
    once, before the blocks (tests/test_aot.py).

    ``block_rows`` counts the rows of one device: under a mesh (``sharding.use``) whose batch axis splits the
    rows over S shards, blocks are S times as many positions, so each device still computes about
    ``block_rows`` rows of logits a block. Counted with the global B, the 6.7B PPO preset's 512-row rollout ran
    one position a block, 16 rows per chip: 1,024 trips, each reading the whole head (docs/scaling.md).

    Shapes: hidden [B,N,D], unembed [V,D] (``model.unembedding``), targets [B,N] token ids.
    """
    block_rows = block_rows * sharding.batch_shards()
    return _token_logprobs(hidden_bnd, unembed_vd, targets_bn, float(temperature), block_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _token_logprobs(hidden_bnd, unembed_vd, targets_bn, temperature, block_rows):
    logp, entropy, _ = _token_forward(hidden_bnd, unembed_vd, targets_bn, temperature, block_rows)
    return logp, entropy


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """[B,N,...] -> [N/block, B, block, ...], N zero-padded to a multiple of ``block``."""
    b, n = x.shape[:2]
    pad = -n % block
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, (n + pad) // block, block, *x.shape[2:]), 1, 0)


def _unblocks(x_kbc: jax.Array, n: int) -> jax.Array:
    """The inverse of ``_blocks`` for [N/block, B, block] -> [B, N]."""
    k, b, c = x_kbc.shape
    return jnp.moveaxis(x_kbc, 0, 1).reshape(b, k * c)[:, :n]


def _block_logits(h_bcd: jax.Array, w_vd: jax.Array, temperature: float) -> jax.Array:
    # The head's own arithmetic (model.py): hidden-dtype inputs, float32 logits.
    return jnp.einsum("bcd,vd->bcv", h_bcd, w_vd, preferred_element_type=jnp.float32) / temperature


def _token_forward(hidden_bnd, unembed_vd, targets_bn, temperature, block_rows):
    n = hidden_bnd.shape[1]
    blocks = -(-n // max(1, block_rows // hidden_bnd.shape[0]))  # at most block_rows // B positions a block,
    block = -(-n // blocks)  # spread evenly: fewer than `blocks` padded positions, none past a short response
    # Every block needs the whole embedding axis of the weight: gathered here, once. Left FSDP-sharded, the XLA
    # TPU compiler all-gathered it inside the loop, once per block (XLA:CPU hoists it; docs/scaling.md).
    w_vd = nn.with_logical_constraint(unembed_vd.astype(hidden_bnd.dtype), ("vocab", None))

    def one_block(xs):
        h_bcd, y_bc = xs
        z = _block_logits(h_bcd, w_vd, temperature)
        top = z.max(axis=-1)
        unnormalised = jnp.exp(z - top[..., None])
        total = unnormalised.sum(axis=-1)
        lse = top + jnp.log(total)
        picked = jnp.take_along_axis(z, y_bc[..., None], axis=-1)[..., 0]
        return picked - lse, lse - (unnormalised * z).sum(axis=-1) / total, lse

    logp, entropy, lse = jax.lax.map(one_block, (_blocks(hidden_bnd, block), _blocks(targets_bn, block)))
    return _unblocks(logp, n), _unblocks(entropy, n), _unblocks(lse, n)


def _token_fwd(hidden_bnd, unembed_vd, targets_bn, temperature, block_rows):
    logp, entropy, lse = _token_forward(hidden_bnd, unembed_vd, targets_bn, temperature, block_rows)
    return (logp, entropy), (hidden_bnd, unembed_vd, targets_bn, lse, entropy)


def _token_bwd(temperature, block_rows, residuals, cotangents):
    # Vocabulary blocks, not position blocks: each block's logits for every position, from the forward's lse
    # and Σ p z. A position-blocked backward sums the [V,D] gradient over blocks in a loop carry, and with the
    # batch sharded XLA all-reduced that carry once per block (k times the bytes of autodiff's one all-reduce;
    # tests/test_rollout_layout.py); here the carry is the batch-sharded [B,N,D] hidden gradient, which needs no
    # collective, and each block's [V/k,D] slice of the weight gradient is reduced once.
    hidden_bnd, unembed_vd, targets_bn, lse, entropy = residuals
    g_logp, g_entropy = (g[..., None] for g in cotangents)
    b, n, d = hidden_bnd.shape
    v = unembed_vd.shape[0]
    # Slices of about block_rows / 8 positions' worth of logits (8x the forward's blocks at long responses):
    # faster than 1-4x (larger blocks) and 16-32x on machine G (docs/benchmarks.md); short inputs take fewer.
    k = -(-8 * b * n // block_rows)
    vb = -(-v // k)
    w_kvd = jnp.pad(unembed_vd.astype(hidden_bnd.dtype), ((0, k * vb - v), (0, 0))).reshape(k, vb, d)
    lse, mean_z = lse[..., None], (lse - entropy)[..., None]  # mean_z = Σ_v p_v z_v
    h_f32 = hidden_bnd.astype(jnp.float32)

    def body(g_h, xs):
        w_bd, first = xs
        z = _block_logits(hidden_bnd, w_bd, temperature)  # [B,N,vb]
        ids = first + jnp.arange(vb)
        p = jnp.where(ids < v, jnp.exp(z - lse), 0.0)  # the padded rows are no tokens
        g_z = g_logp * (targets_bn[..., None] == ids) - p * (g_logp + g_entropy * (z - mean_z))
        g_z = g_z / temperature
        g_h = g_h + jnp.einsum("bnv,vd->bnd", g_z.astype(w_bd.dtype), w_bd, preferred_element_type=jnp.float32)
        return g_h, jnp.einsum("bnv,bnd->vd", g_z, h_f32)

    g_h, g_w = jax.lax.scan(body, jnp.zeros((b, n, d), jnp.float32), (w_kvd, jnp.arange(k) * vb))
    g_targets = np.zeros(targets_bn.shape, jax.dtypes.float0)
    return g_h.astype(hidden_bnd.dtype), g_w.reshape(k * vb, d)[:v].astype(unembed_vd.dtype), g_targets


_token_logprobs.defvjp(_token_fwd, _token_bwd)


def response_values(
    model: Transformer, params: Any, tokens_bt: jax.Array, mask_bt: jax.Array, prompt_len: int
) -> jax.Array:
    """V_t for each response token: the value model's output at the position before it."""
    return model.apply({"params": params}, tokens_bt, mask_bt)[:, prompt_len - 1 : -1]

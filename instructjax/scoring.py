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

from typing import Any

import jax
import jax.numpy as jnp

from instructjax.model import Transformer


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
    responses were drawn from (as Ziegler et al.'s and Huang et al. 2024's code do; the paper samples at 1)."""
    if prompt_len < 1:
        raise ValueError(f"prompt_len={prompt_len}: the first response token is predicted from a prompt token")
    # Only the logits that predicted each y_t (positions prompt_len-1 .. T-2): the head skips the prompt's.
    logits = model.apply({"params": params}, tokens_bt, mask_bt, head_from=prompt_len - 1)[:, :-1]
    logits = logits.astype(jnp.float32) / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    # logit[y] - logsumexp: never a [B,N,V] log-softmax under the update's gradient (the entropy is not
    # differentiated, so its softmax is computed in scoring only).
    logp = jnp.take_along_axis(logits, tokens_bt[:, prompt_len:, None], axis=-1)[..., 0] - lse
    entropy = lse - (jax.nn.softmax(logits, axis=-1) * logits).sum(axis=-1)
    return logp, entropy


def response_values(
    model: Transformer, params: Any, tokens_bt: jax.Array, mask_bt: jax.Array, prompt_len: int
) -> jax.Array:
    """V_t for each response token: the value model's output at the position before it."""
    return model.apply({"params": params}, tokens_bt, mask_bt)[:, prompt_len - 1 : -1]

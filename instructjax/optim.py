"""The optimizer from config: AdamW (paper: b1 0.9, b2 0.95), warmup + cosine decay to 10% of peak,
global-norm clipping, weight decay on matrices only, gradient accumulation.

``config.optim`` fields (see ``configs/sft.py``): ``lr`` (peak), ``warmup_steps``, ``final_lr_fraction``
(0.1: the paper's "cosine decay to 10% of peak"; 1.0: constant), optional ``warmup_start_fraction``,
``b1``, ``b2``, ``eps``, ``weight_decay``, ``grad_clip`` (0 disables), ``grad_accum_steps``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def lr_schedule(optim: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup from ``warmup_start_fraction * lr`` (default 0) to ``lr`` over ``warmup_steps``, then
    cosine to ``final_lr_fraction * lr`` at ``total_steps`` (optimizer updates, i.e. after accumulation)."""
    decay_steps = max(total_steps - optim.warmup_steps, 1)
    cosine = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.final_lr_fraction)
    if optim.warmup_steps == 0:
        return cosine
    start = optim.get("warmup_start_fraction", 0.0) * optim.lr  # PPO warms up from 0.1x peak (App. C.4)
    warmup = optax.linear_schedule(start, optim.lr, optim.warmup_steps)
    return optax.join_schedules([warmup, cosine], [optim.warmup_steps])


def decay_mask(params: Any) -> Any:
    """Weight decay on weight matrices (ndim >= 2) only: not on biases or norm scales, as is usual
    for GPT-style models (the paper does not say)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: Any, total_steps: int) -> optax.GradientTransformation:
    """Clip, then AdamW; with ``grad_accum_steps = k`` the update is applied every k calls with the
    mean gradient (``optax.MultiSteps``), so ``total_steps`` counts updates, not micro-batches."""
    parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    parts.append(
        optax.adamw(
            lr_schedule(optim, total_steps),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        )
    )
    tx = optax.chain(*parts)
    if optim.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum_steps).gradient_transformation()
    return tx

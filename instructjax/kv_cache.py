"""The KV cache the decoder appends to while sampling (``Transformer(cfg).apply(..., cache=cache)``):
an empty one (``init_cache``), one with more slots (``grow_cache``), one with every row repeated
(``repeat_cache``: a prompt prefilled once for several samples) and its leaves' logical axis names
(``cache_logical_axes``, for sharding). ``init_cache`` returns an explicit pytree::

    {'layers': {'k': [L,B,K,S,H], 'v': [L,B,K,S,H]}  (a list of per-layer dicts when layers are not
                                                       scanned),
     'mask':     [B,S] bool   which slots hold a real token,
     'index':    []    int32  the next slot to write (the same for every row),
     'next_pos': [B]   int32  each row's next position id}

Shape legend as in ``model.py``: L layers, B batch, K kv heads, S slots, H head_dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from instructjax.model_config import ModelConfig

Cache = dict[str, Any]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> Cache:
    """An empty KV cache with ``max_len`` slots per row (prompt plus generated tokens)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, cfg.num_kv_heads, max_len, cfg.dim_per_head)
    if cfg.scan_layers:
        layers = {"k": jnp.zeros((cfg.n_layers, *shape), dtype), "v": jnp.zeros((cfg.n_layers, *shape), dtype)}
    else:
        layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]
    return {
        "layers": layers,
        "mask": jnp.zeros((batch, max_len), jnp.bool_),
        "index": jnp.zeros((), jnp.int32),
        "next_pos": jnp.zeros((batch,), jnp.int32),
    }


def grow_cache(cfg: ModelConfig, cache: Cache, max_len: int) -> Cache:
    """``cache`` with empty slots appended up to ``max_len``: what it holds is unchanged."""

    def grow(names, x):
        if "length" not in names:
            return x
        axis = names.index("length")
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, max_len - x.shape[axis])
        return jnp.pad(x, widths)

    return jax.tree.map(grow, cache_logical_axes(cfg), cache, is_leaf=lambda x: isinstance(x, tuple))


def repeat_cache(cfg: ModelConfig, cache: Cache, times: int) -> Cache:
    """``cache`` with each row repeated ``times`` times in place (row i becomes rows i·times .. i·times + times
    - 1): one prefilled prompt shared by its ``times`` samples (``sampling.generate(samples_per_prompt=)``)."""

    def repeat(names, x):
        return jnp.repeat(x, times, axis=names.index("batch")) if "batch" in names else x

    return jax.tree.map(repeat, cache_logical_axes(cfg), cache, is_leaf=lambda x: isinstance(x, tuple))


def cache_logical_axes(cfg: ModelConfig) -> Cache:
    """Logical axis names of every cache leaf, in the structure of ``init_cache``."""
    kv = ("batch", "kv_heads", "length", "head_dim")
    if cfg.scan_layers:
        layers = {"k": ("layers", *kv), "v": ("layers", *kv)}
    else:
        layers = [{"k": kv, "v": kv} for _ in range(cfg.n_layers)]
    return {"layers": layers, "mask": ("batch", "length"), "index": (), "next_pos": ("batch",)}

"""A model preset at a glance: size, sharding plan, and (small models) a timed sharded forward pass."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from instructjax import sharding
from instructjax.model import ModelConfig, Transformer


def report(config: Any, run: bool = True, batch: int = 8, length: int = 64) -> dict[str, Any]:
    """Size and sharding plan of ``config.model`` on ``config.mesh_shape``; with ``run``, also init the
    params sharded on the mesh and time the first (compile) and a second call of a jitted forward."""
    cfg = ModelConfig.from_dict(config.model)
    model, mesh, rules = Transformer(cfg), sharding.make_mesh(config.mesh_shape), sharding.as_rules(config.rules)
    length = min(length, cfg.max_len)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    out: dict[str, Any] = {"model": config.model.to_dict(), **sharding.plan(model, mesh, rules, tokens[:1])}
    if not run:
        return out
    params, _ = sharding.init_params(model, jax.random.key(config.seed), tokens[:1], mesh, rules)
    with sharding.use(mesh, rules):
        forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
        global_tokens = sharding.to_global(tokens, mesh, rules)
        for name in ("first_call_seconds", "second_call_seconds"):
            start = time.perf_counter()
            output = jax.block_until_ready(forward(params, global_tokens))
            out[name] = round(time.perf_counter() - start, 4)
    out["output_shape"] = list(output.shape)
    out["output_finite"] = bool(np.isfinite(np.asarray(output)).all())
    return out

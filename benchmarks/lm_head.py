"""The blocked LM head (``scoring.token_logprobs``) against autodiff of the plain log-softmax: seconds on this
machine, or the collective bytes of the gradient on 8 (fake) devices.

    python benchmarks/lm_head.py                                  # V 50,257; three B×N×D shapes
    python benchmarks/lm_head.py --shapes=8x512x256 --repeats=3
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/lm_head.py --collectives

Timing: the forward (log-probs and entropy) and the gradient of both, each jitted, taking turns
(``timing.best_interleaved``); the plain version holds the [B,N,V] float32 logits. Collectives: both gradients
compiled with the batch sharded over ``fsdp`` (fsdp 8, and fsdp 4 × tensor 2 with the vocabulary over
``tensor``), their bytes per device read by ``hlo_stats`` (all-reduce, all-gather). The last line printed is
one JSON object.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from timing import best_interleaved

from instructjax import hlo_stats, scoring, sharding


def plain(h_bnd: jax.Array, w_vd: jax.Array, y_bn: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-probs and entropy through the full [B,N,V] logits (what autodiff differentiates)."""
    log_p = jax.nn.log_softmax(jnp.einsum("bnd,vd->bnv", h_bnd, w_vd, preferred_element_type=jnp.float32), axis=-1)
    return jnp.take_along_axis(log_p, y_bn[..., None], axis=-1)[..., 0], -(jnp.exp(log_p) * log_p).sum(-1)


def blocked(h_bnd: jax.Array, w_vd: jax.Array, y_bn: jax.Array, block_rows: int = 256) -> tuple[jax.Array, jax.Array]:
    return scoring.token_logprobs(h_bnd, w_vd, y_bn, 1.0, block_rows=block_rows)


def inputs(b: int, n: int, d: int, v: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(b, n, d), jnp.float32)
    return hidden, jnp.asarray(rng.randn(v, d) * 0.02, jnp.float32), jnp.asarray(rng.randint(0, v, (b, n)), jnp.int32)


def objective(head, **kw):
    return lambda h, w, y: sum(out.sum() for out in head(h, w, y, **kw))


def timings(shapes: list[tuple[int, int, int]], vocab: int, repeats: int) -> list[dict]:
    out = []
    for b, n, d in shapes:
        args = inputs(b, n, d, vocab)
        fns = {
            f"{kind}_{name}": jax.jit(head if kind == "forward" else jax.grad(objective(head), argnums=(0, 1)))
            for kind in ("forward", "gradient")
            for name, head in (("blocked", blocked), ("plain", plain))
        }
        seconds = best_interleaved(
            {k: (lambda f=f, a=args: jax.block_until_ready(f(*a))) for k, f in fns.items()}, repeats
        )
        out.append({"shape": f"{b}x{n}x{d}", "vocab": vocab, "seconds": seconds})
    return out


def collectives(b: int, n: int, d: int, vocab: int, block_rows: int) -> list[dict]:
    if jax.device_count() < 8:
        raise SystemExit("--collectives needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    args = inputs(b, n, d, vocab)
    out = []
    for mesh_shape in ((1, 8, 1), (1, 4, 2)):
        mesh = sharding.make_mesh(mesh_shape, jax.devices()[:8])
        batch = P(("data", "fsdp"))
        in_shardings = tuple(NamedSharding(mesh, s) for s in (batch, P("tensor", "fsdp"), batch))
        for name, head, kw in (("blocked", blocked, {"block_rows": block_rows}), ("plain", plain, {})):
            grad = jax.jit(jax.grad(objective(head, **kw), argnums=(0, 1)), in_shardings=in_shardings)
            total = hlo_stats.program_stats(grad.lower(*args).compile().as_text()).total()
            out.append({"mesh": "x".join(map(str, mesh_shape)), "head": name, "bytes": dict(total.collectives)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="8x512x256,8x256x768,32x256x256", help="B×N×D, comma-separated")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--collectives", action="store_true", help="collective bytes on 8 devices instead")
    parser.add_argument("--collective_shape", default="16x128x64x4096", help="B×N×D×V for --collectives")
    parser.add_argument("--block_rows", type=int, default=64, help="token_logprobs' block_rows for --collectives")
    args = parser.parse_args()
    if args.collectives:
        b, n, d, v = (int(x) for x in args.collective_shape.split("x"))
        result = {"collectives": collectives(b, n, d, v, args.block_rows), "shape": args.collective_shape}
    else:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        result = {"timings": timings(shapes, args.vocab, args.repeats), "backend": jax.default_backend()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

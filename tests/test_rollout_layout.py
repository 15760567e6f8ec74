"""The rollout's decode layout (``sharding.decode_shardings``, ``train_ppo.decode_layout``) on 8 fake CPU devices:
generation gives the same tokens from the training (FSDP) layout and from the decode layout; ``hlo_stats`` finds
the collectives of a small hand-made program, inside and outside a loop; the decode loop's collective bytes
per step fall with the decode layout; and the blocked LM head's gradient and the fused LM loss reduce their weight
gradient once."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import load_config
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from instructjax import hlo_stats, losses, sampling, scoring, sharding, train_ppo
from instructjax.model import ModelConfig, Transformer

MAX_NEW = 12


def test_hlo_stats_counts_a_gather_per_loop_trip_and_a_reduction_outside():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    split, whole = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())

    def f(w, v):
        def body(i, carry):  # w changes every trip and stays split: it is gathered inside the loop
            w, acc = carry
            w = jax.lax.with_sharding_constraint(jnp.sin(w), split)
            return w, acc + jax.lax.with_sharding_constraint(w * 2.0, whole)[:4]

        return jax.lax.fori_loop(0, 5, body, (w, jnp.zeros(4, w.dtype)))[1], v.sum()

    args = (
        jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=split),
        jax.ShapeDtypeStruct((64,), jnp.float32, sharding=split),
    )
    stats = hlo_stats.program_stats(jax.jit(f, out_shardings=(whole, whole)).lower(*args).compile().as_text())
    (loop,) = stats.loops
    assert loop.trips == 5
    assert loop.per_trip.collectives == {"all-gather": 4096.0}  # 1024 f32, gathered whole every trip
    assert stats.outside.collectives.get("all-reduce", 0) >= 4  # the sum of v: partial sums reduced
    total = stats.total()
    assert total.collectives["all-gather"] == 5 * 4096
    assert total.hbm_bytes > 5 * 4096


def test_hlo_stats_reads_tpu_style_text():
    # TPU wraps an async collective in a fusion and leaves the loop's trip count in its condition.
    text = """HloModule m

%gather (p: bf16[4,128]) -> bf16[16,128] {
  %p = bf16[4,128]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[16,128]{1,0:T(8,128)(2,1)} all-gather(%p), replica_groups=[1,4]<=[4], dimensions={0}
}

%cond (c: (s32[], bf16[4,128])) -> pred[] {
  %c = (s32[], bf16[4,128]) parameter(0)
  %i = s32[] get-tuple-element(%c), index=0
  %limit = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (b: (s32[], bf16[4,128])) -> (s32[], bf16[4,128]) {
  %b = (s32[], bf16[4,128]) parameter(0)
  %w = bf16[4,128]{1,0} get-tuple-element(%b), index=1
  %g = bf16[16,128]{1,0} fusion(%w), kind=kCustom, calls=%gather
  %i = s32[] get-tuple-element(%b), index=0
  ROOT %t = (s32[], bf16[4,128]) tuple(%i, %w)
}

ENTRY %main (x: bf16[4,128]) -> f32[8] {
  %x = bf16[4,128]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %t = (s32[], bf16[4,128]) tuple(%zero, %x)
  %loop = (s32[], bf16[4,128]) while(%t), condition=%cond, body=%body
  %r = f32[8]{0} parameter(1)
  ROOT %all-reduce.2 = f32[8]{0} all-reduce(%r), to_apply=%add
}
"""
    stats = hlo_stats.program_stats(text)
    (loop,) = stats.loops
    assert loop.trips == 7 and loop.per_trip.collectives == {"all-gather": 16 * 128 * 2}
    assert stats.outside.collectives == {"all-reduce": 32}
    assert stats.total().collectives == {"all-gather": 7 * 4096, "all-reduce": 32}
    # the fusion reads its shard and writes the whole; the condition's compare reads two s32 and writes a pred
    assert loop.per_trip.hbm_bytes == 4 * 128 * 2 + 16 * 128 * 2 + 9


@pytest.fixture(scope="module")
def tiny_on_fsdp8():
    cfg = ModelConfig.from_dict(load_config("configs/model.py", "tiny").model)
    mesh, rules = sharding.make_mesh((1, 8, 1)), sharding.DEFAULT_RULES
    params, param_sh = sharding.init_params(
        Transformer(cfg), jax.random.key(0), np.zeros((1, 8), np.int32), mesh, rules
    )
    rng = np.random.default_rng(0)
    prompts, mask = sampling.pad_prompts([rng.integers(2, cfg.vocab_size, n).tolist() for n in range(3, 11)], 0)
    return cfg, mesh, rules, params, param_sh, prompts, mask


def _decode_step_collectives(cfg, mesh, rules, params, prompts, mask):
    with sharding.use(mesh, rules):
        batch = sharding.to_global({"p": prompts, "m": mask}, mesh, rules)
        traced = sampling._generate_cached.trace(
            params, batch["p"], batch["m"], jax.random.key(1), jnp.float32(1.0), jnp.float32(1.0), jnp.int32(1),
            jnp.int32(0), cfg=cfg, max_new_tokens=MAX_NEW, top_k=0,
        )  # fmt: skip
        stats = hlo_stats.program_stats(traced.lower().compile().as_text())
    loops = stats.unknown_trip_loops()
    return sum(hlo_stats.decode_step_bytes(stats).values()), stats.total(MAX_NEW / len(loops)).collective_bytes


def test_decode_layout_gives_the_same_tokens_and_moves_fewer_bytes_per_step(tiny_on_fsdp8):
    cfg, mesh, rules, params, param_sh, prompts, mask = tiny_on_fsdp8
    decode_params = sharding.to_decode_layout(param_sh, cfg.dtype)(params)
    embedding = decode_params["embed"]["embedding"]
    assert embedding.sharding.spec == P("tensor", None)  # whole over fsdp, still split over tensor (here 1)
    assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")

    outs = []
    with sharding.use(mesh, rules):
        batch = sharding.to_global({"p": prompts, "m": mask}, mesh, rules)
        for p in (params, decode_params):
            outs.append(
                sampling.generate(p, cfg, batch["p"], batch["m"], jax.random.key(3), max_new_tokens=MAX_NEW, eos_id=1)
            )
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_allclose(np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), atol=1e-5)

    train_step, train_run = _decode_step_collectives(cfg, mesh, rules, params, prompts, mask)
    decode_step, decode_run = _decode_step_collectives(cfg, mesh, rules, decode_params, prompts, mask)
    assert decode_step < train_step / 10, (decode_step, train_step)
    assert decode_run < train_run / 100, (decode_run, train_run)  # the parameters are no longer gathered


def test_cast_for_compute_and_the_decode_layout_switch():
    cfg = ModelConfig.from_dict({**load_config("configs/model.py", "tiny").model, "dtype": "bfloat16"})
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    cast = jax.eval_shape(lambda p: sharding.cast_for_compute(p, jnp.bfloat16), sharding.strip_boxes(shapes))
    assert (
        cast["embed"]["embedding"].dtype == jnp.bfloat16
        and cast["layers_0"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    )
    assert cast["final_norm"]["scale"].dtype == jnp.float32  # norms keep their stored dtype

    fsdp, single = sharding.make_mesh((1, 8, 1)), sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    assert sharding.reshards_for_decoding("replicated", fsdp) and not sharding.reshards_for_decoding("train", fsdp)
    assert not sharding.reshards_for_decoding("replicated", single)
    with pytest.raises(ValueError, match="config.decode_layout='gathered'"):
        sharding.reshards_for_decoding("gathered", fsdp)
    spec = NamedSharding(fsdp, P(("data", "fsdp"), "tensor", None))
    assert sharding.decode_shardings({"w": spec})["w"].spec == P(None, "tensor", None)
    config = ml_collections.ConfigDict({"decode_layout": "train"})
    assert train_ppo.decode_layout(config, None, fsdp)("params") == "params"  # the identity: no copy


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 4, 2)])
def test_blocked_head_gradient_reduces_the_weight_gradient_once_not_once_per_block(mesh_shape):
    """With the batch sharded (FSDP), ``scoring.token_logprobs``' gradient all-reduces the [V,D] weight gradient
    about once, as autodiff of the plain log-softmax does, however many blocks it runs (here 16 positions in
    blocks of 4: 4 forward blocks). A backward that sums the weight gradient in a loop carry over position
    blocks all-reduced it once per block (4x and more)."""
    mesh = sharding.make_mesh(mesh_shape)
    b, n, d, v = 16, 16, 32, 1000
    rng = np.random.RandomState(0)
    hidden, unembed = jnp.asarray(rng.randn(b, n, d), jnp.float32), jnp.asarray(rng.randn(v, d) * 0.1, jnp.float32)
    targets = jnp.asarray(rng.randint(0, v, (b, n)), jnp.int32)
    batch = P(("data", "fsdp"))
    in_shardings = (NamedSharding(mesh, batch), NamedSharding(mesh, P("tensor", "fsdp")), NamedSharding(mesh, batch))

    def blocked(h, w, y):
        logp, entropy = scoring.token_logprobs(h, w, y, 1.0, block_rows=64)
        return logp.sum() + 0.1 * entropy.sum()

    def plain(h, w, y):
        log_p = jax.nn.log_softmax(jnp.einsum("bnd,vd->bnv", h, w), axis=-1)
        entropy = -(jnp.exp(log_p) * log_p).sum(-1)
        return jnp.take_along_axis(log_p, y[..., None], axis=-1)[..., 0].sum() + 0.1 * entropy.sum()

    reduced = {}
    for name, fn in (("blocked", blocked), ("plain", plain)):
        grad = jax.jit(jax.grad(fn, argnums=(0, 1)), in_shardings=in_shardings)
        text = grad.lower(hidden, unembed, targets).compile().as_text()
        reduced[name] = hlo_stats.program_stats(text).total().collectives.get("all-reduce", 0.0)
        if name == "blocked":
            got = grad(hidden, unembed, targets)
    want = jax.jit(jax.grad(plain, argnums=(0, 1)))(hidden, unembed, targets)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
    weight_bytes = v * d * 4
    assert reduced["plain"] >= weight_bytes / mesh_shape[2] * 0.5, reduced  # the reference does reduce it
    assert reduced["blocked"] <= 1.5 * max(reduced["plain"], weight_bytes), reduced


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 4, 2)])
def test_fused_lm_loss_under_fsdp_keeps_rows_on_their_device_and_reduces_the_weight_gradient_once(mesh_shape):
    """SFT's (and PPO-ptx's) ``losses.fused_lm_loss`` under the training mesh and rules, the batch sharded: no
    more all-reduce than autodiff of the plain loss (the weight gradient, once). Chunks of the flattened rows
    had split their contraction over D and all-reduced every chunk's logits: 32x the weight's bytes here."""
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.as_rules(load_config("configs/model.py", "tiny").rules)
    b, t, d, v = 16, 129, 64, 1000
    rng = np.random.RandomState(0)
    hidden, unembed = jnp.asarray(rng.randn(b, t, d), jnp.float32), jnp.asarray(rng.randn(v, d) * 0.1, jnp.float32)
    tokens = jnp.asarray(rng.randint(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.rand(b, t) > 0.2, jnp.float32)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    in_shardings = (rows, NamedSharding(mesh, P("tensor", "fsdp")), rows, rows)

    def fused(h, w, y, m):
        return losses.fused_lm_loss(h, w, y, m, 64)[0]

    def plain(h, w, y, m):
        return losses.lm_loss(jnp.einsum("btd,vd->btv", h, w), y, m)[0]

    reduced, got = {}, {}
    with sharding.use(mesh, rules):
        for name, fn in (("fused", fused), ("plain", plain)):
            step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)), in_shardings=in_shardings)
            text = step.lower(hidden, unembed, tokens, mask).compile().as_text()
            reduced[name] = hlo_stats.program_stats(text).total().collectives.get("all-reduce", 0.0)
            got[name] = step(hidden, unembed, tokens, mask)
    np.testing.assert_allclose(got["fused"][0], got["plain"][0], rtol=1e-6)
    for g, w in zip(got["fused"][1], got["plain"][1], strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6)
    assert reduced["fused"] <= 1.5 * max(reduced["plain"], v * d * 4 / mesh_shape[2]), reduced

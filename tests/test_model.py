"""The Transformer: sharding invariance, KV cache, padding, heads, scan/remat, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from instructjax import sharding
from instructjax.kv_cache import grow_cache, init_cache
from instructjax.model import ModelConfig, Transformer

STYLES = ["tiny", "tiny_llama"]
MESHES = {"1 device": None, "data=8": (8, 1, 1), "fsdp=4,tensor=2": (1, 4, 2), "data=2,fsdp=2,tensor=2": (2, 2, 2)}


def make_cfg(preset: str, **overrides) -> ModelConfig:
    cfg = load_config("configs/model.py", preset)
    return ModelConfig.from_dict({**cfg.model.to_dict(), **overrides})


def random_batch(cfg: ModelConfig, batch=8, length=16, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    lengths = rng.randint(length // 2, length + 1, batch)
    lengths[0] = length
    mask = (np.arange(length)[None, :] >= (length - lengths)[:, None]).astype(np.int32)  # left padding
    return tokens, mask


def mesh_for(shape):
    if shape is None:
        return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return sharding.make_mesh(shape)


def lm_loss(params, model, tokens, mask):
    logits = model.apply({"params": params}, tokens, mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    weights = mask[:, 1:] * mask[:, :-1]
    return (ce * weights).sum() / weights.sum()


def run_on_mesh(cfg, shape, tokens, mask):
    """Sharded init, forward and gradient on a mesh; returns numpy (logits, grads)."""
    model, mesh, rules = Transformer(cfg), mesh_for(shape), sharding.DEFAULT_RULES
    params, param_sh = sharding.init_params(model, jax.random.key(0), tokens[:1], mesh, rules)
    with sharding.use(mesh, rules):
        batch = sharding.to_global((tokens, mask), mesh, rules)
        fwd = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m))
        grad = jax.jit(jax.grad(lm_loss), static_argnums=1, out_shardings=param_sh)
        logits = fwd(params, *batch)
        grads = grad(params, model, *batch)
    return np.asarray(logits), jax.tree.map(np.asarray, grads)


@pytest.mark.slow
@pytest.mark.parametrize("preset", STYLES)
def test_forward_and_gradients_equal_on_every_mesh(preset):
    cfg = make_cfg(preset)
    tokens, mask = random_batch(cfg)
    ref_logits, ref_grads = run_on_mesh(cfg, None, tokens, mask)
    for name, shape in MESHES.items():
        if shape is None:
            continue
        logits, grads = run_on_mesh(cfg, shape, tokens, mask)
        real = mask.astype(bool)
        np.testing.assert_allclose(logits[real], ref_logits[real], atol=1e-5, rtol=0, err_msg=name)
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=f"{name} {jax.tree_util.keystr(path)}")


def test_params_are_sharded_as_the_rules_say():
    cfg = make_cfg("tiny_llama")
    mesh = mesh_for((2, 2, 2))
    params, _ = sharding.init_params(
        Transformer(cfg), jax.random.key(0), np.zeros((1, 4), np.int32), mesh, sharding.DEFAULT_RULES
    )
    q = params["layers_0"]["attn"]["q"]["kernel"]  # (embed, heads, head_dim)
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (32, 2, 16)


CACHE_VARIANTS = {
    "gpt2": ("tiny", {}),
    "llama_gqa": ("tiny_llama", {}),
    "llama_no_gqa": ("tiny_llama", {"n_kv_heads": 0}),
    "gpt2_scanned": ("tiny", {"scan_layers": True}),
    "llama_gqa_scanned_remat": ("tiny_llama", {"scan_layers": True, "remat": "full"}),
    "qwen2_qkv_bias": ("tiny_llama", {"qkv_bias": True}),
}
SLOW_CACHE_VARIANTS = {"gpt2_scanned", "llama_gqa_scanned_remat"}  # scan (and remat) compile the longest


@pytest.mark.parametrize(
    "variant", [pytest.param(v, marks=pytest.mark.slow) if v in SLOW_CACHE_VARIANTS else v for v in CACHE_VARIANTS]
)
def test_kv_cache_prefill_then_decode_equals_full_forward(variant):
    preset, overrides = CACHE_VARIANTS[variant]
    cfg = make_cfg(preset, **overrides)
    model = Transformer(cfg)
    prompt_len, new = 10, 6
    tokens, mask = random_batch(cfg, batch=4, length=prompt_len + new, seed=1)
    # Left-padded prompts of mixed lengths followed by `new` real tokens in every row.
    lengths = np.array([10, 3, 7, 1])
    mask = np.concatenate(
        [(np.arange(prompt_len)[None] >= (prompt_len - lengths)[:, None]), np.ones((4, new), bool)], axis=1
    ).astype(np.int32)
    params = nn.unbox(model.init(jax.random.key(1), tokens)["params"])
    full = model.apply({"params": params}, tokens, mask)

    step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, cache=c))
    cache = init_cache(cfg, 4, prompt_len + 2)  # grown after two decode steps, as generate() grows it
    logits, cache = step(params, tokens[:, :prompt_len], mask[:, :prompt_len], cache)
    outs = [logits]
    for t in range(prompt_len, prompt_len + new):
        if t == prompt_len + 2:
            cache = grow_cache(cfg, cache, prompt_len + new + 2)
        logits, cache = step(params, tokens[:, t : t + 1], mask[:, t : t + 1], cache)
        outs.append(logits)
    cached = jnp.concatenate(outs, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5, rtol=0)
    assert int(cache["index"]) == prompt_len + new and cache["mask"].shape == (4, prompt_len + new + 2)
    np.testing.assert_array_equal(np.asarray(cache["next_pos"]), lengths + new)


@pytest.mark.parametrize("preset", STYLES)
def test_left_and_right_padding_match_unpadded_rows(preset):
    cfg = make_cfg(preset)
    model = Transformer(cfg)
    rng = np.random.RandomState(2)
    rows = [rng.randint(0, cfg.vocab_size, n).astype(np.int32) for n in (12, 5, 9)]
    params = nn.unbox(model.init(jax.random.key(2), rows[0][None])["params"])
    width = 12
    left = np.zeros((3, width), np.int32)
    left_mask = np.zeros((3, width), np.int32)
    right, right_mask = left.copy(), left_mask.copy()
    for i, r in enumerate(rows):
        left[i, width - len(r) :], left_mask[i, width - len(r) :] = r, 1
        right[i, : len(r)], right_mask[i, : len(r)] = r, 1
    apply = jax.jit(lambda t, m: model.apply({"params": params}, t, m))
    out_left, out_right = np.asarray(apply(left, left_mask)), np.asarray(apply(right, right_mask))
    assert np.isfinite(out_left).all() and np.isfinite(out_right).all()  # pad rows stay finite
    for i, r in enumerate(rows):
        alone = np.asarray(apply(r[None], np.ones((1, len(r)), np.int32)))[0]
        np.testing.assert_allclose(out_left[i, width - len(r) :], alone, atol=1e-5, rtol=0)
        np.testing.assert_allclose(out_right[i, : len(r)], alone, atol=1e-5, rtol=0)


def test_scanned_layers_equal_unrolled_layers():
    cfg = make_cfg("tiny_llama")
    tokens, mask = random_batch(cfg, batch=2)
    unrolled = nn.unbox(Transformer(cfg).init(jax.random.key(3), tokens)["params"])
    layers = [unrolled.pop(f"layers_{i}") for i in range(cfg.n_layers)]
    stacked = {**unrolled, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    scanned_cfg = make_cfg("tiny_llama", scan_layers=True, remat="dots")
    a = Transformer(cfg).apply(
        {"params": {**unrolled, **{f"layers_{i}": layer for i, layer in enumerate(layers)}}}, tokens, mask
    )
    b = Transformer(scanned_cfg).apply({"params": stacked}, tokens, mask)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_scalar_head_and_dropout():
    cfg = make_cfg("tiny", head="scalar", dropout_rate=0.2, attention_dropout_rate=0.1)
    model = Transformer(cfg)
    tokens, mask = random_batch(cfg, batch=2)
    params = nn.unbox(model.init(jax.random.key(4), tokens)["params"])
    assert params["score_head"]["kernel"].shape == (cfg.d_model, 1)
    values = model.apply({"params": params}, tokens, mask)
    assert values.shape == tokens.shape and values.dtype == jnp.float32
    again = model.apply({"params": params}, tokens, mask)
    np.testing.assert_array_equal(values, again)  # deterministic by default: dropout off
    drop = lambda seed: model.apply(
        {"params": params}, tokens, mask, deterministic=False, rngs={"dropout": jax.random.key(seed)}
    )
    assert not np.allclose(drop(0), values)
    np.testing.assert_array_equal(drop(0), drop(0))


def test_bf16_compute_with_f32_params_is_close_to_f32():
    cfg = make_cfg("tiny_llama")
    tokens, mask = random_batch(cfg, batch=2)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(5), tokens)["params"])
    f32 = Transformer(cfg).apply({"params": params}, tokens, mask)
    bf16_model = Transformer(make_cfg("tiny_llama", dtype="bfloat16"))
    bf16 = bf16_model.apply({"params": params}, tokens, mask)
    assert bf16.dtype == jnp.float32  # logits are always returned in f32
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    real = mask.astype(bool)
    assert float(jnp.abs(bf16 - f32)[real].max()) < 0.05
    assert not np.array_equal(np.asarray(bf16), np.asarray(f32))  # it really computed in bf16


def test_bad_model_config_is_a_clear_error():
    with pytest.raises(ValueError, match="model.norm='batchnorm'"):
        make_cfg("tiny", norm="batchnorm")
    with pytest.raises(ValueError, match="multiple of n_kv_heads=3"):
        make_cfg("tiny_llama", n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**make_cfg("tiny").__dict__, "d_modle": 3})


@pytest.mark.slow
@pytest.mark.parametrize("preset", STYLES)
def test_packed_segments_match_separate_sequences(preset):
    cfg = make_cfg(preset)
    model = Transformer(cfg)
    rng = np.random.RandomState(4)
    docs = [rng.randint(0, cfg.vocab_size, n).astype(np.int32) for n in (5, 7, 3)]
    packed = np.zeros((1, 16), np.int32)
    segments = np.zeros((1, 16), np.int32)
    start = 0
    for i, d in enumerate(docs):
        packed[0, start : start + len(d)], segments[0, start : start + len(d)] = d, i + 1
        start += len(d)
    params = nn.unbox(model.init(jax.random.key(6), packed)["params"])
    out = np.asarray(jax.jit(lambda t, s: model.apply({"params": params}, t, segment_ids_bt=s))(packed, segments))
    start = 0
    for d in docs:
        alone = np.asarray(model.apply({"params": params}, d[None]))[0]
        np.testing.assert_allclose(out[0, start : start + len(d)], alone, atol=1e-5, rtol=0)
        start += len(d)

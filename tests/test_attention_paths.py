"""Attention paths: which calls may take cuDNN's fused kernel (``ModelConfig.attention_path``), and that the
cuDNN branch's arguments (causal flag + key lengths from a right-padded mask) give ``_attention``'s output.

There is no GPU here, so the branch runs with ``implementation='xla'``: the same call and arguments, another
kernel behind ``jax.nn.dot_product_attention``."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from instructjax import model as model_lib
from instructjax.kv_cache import init_cache
from instructjax.model import ModelConfig, Transformer, _attention, _fused_attention


def make_cfg(preset: str, **overrides) -> ModelConfig:
    return ModelConfig.from_dict({**load_config("configs/model.py", preset).model.to_dict(), **overrides})


def right_padded(batch: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a right-padded mask whose rows hold every length from full to none (an all-pad row)."""
    rng = np.random.RandomState(seed)
    lengths = np.linspace(length, 0, batch).round().astype(int)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return rng.randint(0, 512, (batch, length)).astype(np.int32), mask


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_causal_plus_lengths_equals_attention_on_right_padded_rows(heads, kv_heads):
    b, t, h = 5, 12, 16
    rng = np.random.RandomState(1)
    q = jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv_heads, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv_heads, h)), jnp.float32)
    _, mask_bt = right_padded(b, t)
    # The model's mask for a full forward: causal & (key real | key is the query itself).
    slots = np.arange(t)
    mask_b1ts = ((slots[None, :] <= slots[:, None]) & (mask_bt[:, None, :].astype(bool) | np.eye(t, dtype=bool)))[
        :, None
    ]

    expected = np.asarray(jax.jit(_attention, static_argnums=4)(q, k, v, jnp.asarray(mask_b1ts), None))
    fused = np.asarray(jax.jit(_fused_attention, static_argnums=4)(q, k, v, jnp.asarray(mask_bt, bool), "xla"))
    real = mask_bt.astype(bool)
    np.testing.assert_allclose(fused[real], expected[real], atol=1e-5, rtol=1e-5)
    assert np.isfinite(fused).all()  # pad queries, the all-pad row's included, stay finite

    full = jax.jit(_fused_attention, static_argnums=4)(q, k, v, None, "xla")  # no mask: causal only
    causal_b1ts = jnp.asarray((slots[None, :] <= slots[:, None])[None, None].repeat(b, axis=0))
    np.testing.assert_allclose(full, jax.jit(_attention, static_argnums=4)(q, k, v, causal_b1ts, None), atol=1e-5)


def forwards(model: Transformer, params, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right-padded forward, unmasked forward), jitted: eager flax is slow op by op."""
    fwd = jax.jit(lambda p, t, m: (model.apply({"params": p}, t, m, right_padded=True), model.apply({"params": p}, t)))
    return jax.tree.map(np.asarray, fwd(params, tokens, mask))


@pytest.mark.parametrize("preset, overrides", [("tiny", {"n_layers": 1}), ("tiny_llama", {"scan_layers": True})])
def test_model_through_the_cudnn_branch_matches_the_xla_path(monkeypatch, preset, overrides):
    """The whole forward with the cuDNN branch's plumbing (kinds, lengths, scan), its kernel swapped for XLA."""
    cfg = make_cfg(preset, **overrides)
    tokens, mask = right_padded(6, 16)
    model = Transformer(cfg)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:1])["params"]
    expected, expected_full = forwards(model, params, tokens, mask)

    monkeypatch.setattr(model_lib, "_FUSED_IMPLEMENTATION", "xla")
    monkeypatch.setattr(ModelConfig, "attention_path", lambda self, kind, **_: "cudnn" if kind != "cache" else "xla")
    fused, fused_full = forwards(model, params, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(fused[real], expected[real], atol=1e-5, rtol=1e-5)
    assert np.isfinite(fused).all()
    np.testing.assert_allclose(fused_full, expected_full, atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_leaves_the_forward_unchanged():
    cfg = make_cfg("tiny_llama", n_layers=1)
    assert cfg.attention == "auto"
    tokens, mask = right_padded(4, 16)
    model, xla_model = Transformer(cfg), Transformer(dataclasses.replace(cfg, attention="xla"))
    params = jax.jit(model.init)(jax.random.key(0), tokens[:1])["params"]
    auto, auto_general = jax.jit(
        lambda p: (
            model.apply({"params": p}, tokens, mask, right_padded=True),
            model.apply({"params": p}, tokens, mask),
        )
    )(params)
    np.testing.assert_array_equal(auto, auto_general)
    np.testing.assert_array_equal(auto, jax.jit(lambda p: xla_model.apply({"params": p}, tokens, mask))(params))


def test_path_selector():
    bf16 = make_cfg("tiny", dtype="bfloat16")  # head_dim 16
    for kind in ("causal", "prefix", "general", "segments", "cache"):
        assert bf16.attention_path(kind) == "xla"  # CPU
        assert bf16.attention_path(kind, backend="tpu") == "xla"
    # A GPU backend named for planning (none here): taken as NVIDIA with the pre-Hopper head_dim limit.
    assert bf16.attention_path("prefix", backend="gpu") == "cudnn"
    assert bf16.attention_path("causal", backend="gpu") == "cudnn"
    for kind in ("general", "segments", "cache"):
        assert bf16.attention_path(kind, backend="gpu") == "xla"
        assert "not causal + lengths" in bf16.cudnn_refusal(kind, backend="gpu")
    assert dataclasses.replace(bf16, attention="xla").attention_path("prefix", backend="gpu") == "xla"
    assert make_cfg("tiny").attention_path("prefix", backend="gpu") == "xla"  # float32
    assert make_cfg("tiny", dtype="float16").attention_path("prefix", backend="gpu") == "cudnn"
    dropout = dataclasses.replace(bf16, attention_dropout_rate=0.1)
    assert dropout.attention_path("prefix", backend="gpu") == "cudnn"  # evaluation: no dropout
    assert dropout.attention_path("prefix", deterministic=False, backend="gpu") == "xla"
    assert "head_dim=12" in make_cfg("tiny", dtype="bfloat16", head_dim=12).cudnn_refusal(backend="gpu")
    assert "at most 128" in make_cfg("tiny", dtype="bfloat16", head_dim=160).cudnn_refusal(backend="gpu")
    with pytest.raises(ValueError, match="mask kind 'left'"):
        bf16.attention_path("left")
    with pytest.raises(ValueError, match="attention='flash'"):
        make_cfg("tiny", attention="flash")


@pytest.mark.parametrize(
    "overrides, backend, why",
    [
        ({"dtype": "bfloat16"}, None, "the backend is cpu"),
        ({"dtype": "bfloat16"}, "tpu", "the backend is tpu"),
        ({}, "gpu", "dtype=float32"),
        ({"dtype": "bfloat16", "head_dim": 12}, "gpu", "head_dim=12"),
        ({"dtype": "bfloat16", "attention_dropout_rate": 0.1}, "gpu", "attention_dropout_rate=0.1 while training"),
    ],
)
def test_cudnn_where_refused_is_an_error_saying_why(overrides, backend, why):
    cfg = make_cfg("tiny", attention="cudnn", **overrides)
    with pytest.raises(ValueError, match=f"model.attention='cudnn' is not possible: {why}"):
        cfg.attention_path("prefix", deterministic=False, backend=backend)
    # A call whose mask is not causal + lengths takes XLA under 'cudnn' too: sampling still runs.
    assert cfg.attention_path("cache", backend=backend) == "xla"


def test_model_with_cudnn_on_cpu():
    cfg = make_cfg("tiny", attention="cudnn", dtype="bfloat16")
    tokens, mask = right_padded(2, 8)
    model = Transformer(cfg)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens[:1], mask[:1])["params"]  # general mask: no error
    with pytest.raises(ValueError, match="the backend is cpu"):
        jax.eval_shape(lambda p: model.apply({"params": p}, tokens, mask, right_padded=True), params)
    with pytest.raises(ValueError, match="right_padded describes"):
        cache = init_cache(cfg, 2, 8)
        jax.eval_shape(lambda p: model.apply({"params": p}, tokens, mask, cache=cache, right_padded=True), params)

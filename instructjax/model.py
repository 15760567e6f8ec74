"""Decoder-only Transformer: GPT-2 style and Llama style from one config.

The model is flax linen used purely functionally: ``Transformer(cfg).apply({'params': p}, tokens)``.
Params are plain pytrees whose leaves carry logical axis names (see ``sharding.py``).

Shape legend: B batch, T length of the chunk being processed, S key length (all cache slots when
decoding), D d_model, N query heads, K kv heads (GQA), H head_dim, F mlp hidden, V vocab, L layers.

Padding and positions. ``mask_bt`` marks real tokens (1) and padding (0). Prompts are left-padded
for generation, so positions come from ``cumsum(mask) - 1`` (clamped at 0 on the pads): a left-padded
row gets the same positions, and therefore the same per-token outputs, as the unpadded row. A query
always attends to itself as well as to the real keys before it, so no row of the attention mask is
empty: a pad query is well defined under any masking implementation (an all-masked row would be
uniform with a finite fill, NaN with -inf). Pad outputs are meaningless and masked by every loss.

KV cache. ``kv_cache.init_cache`` returns an explicit pytree (``kv_cache.py`` shows it). Calling the model
with ``cache=`` appends the chunk ``tokens_bt`` at ``index``: a whole left-padded prompt (prefill) or one
token per row (decode) go through the same code, and the call returns ``(output, new_cache)``. Slots are in
time order, so causality is ``slot_key <= slot_query``.

Attention implementation. ``_attention`` (XLA einsums) serves every call; a call whose mask is causal + per-row
key lengths (no mask, or ``right_padded=True``) on an NVIDIA GPU in bf16/f16 takes cuDNN's fused kernel instead
(``_fused_attention``). ``ModelConfig.attention_path`` decides, statically; docs/gpu.md lists the cases.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instructjax.kv_cache import Cache
from instructjax.model_config import REMAT_POLICIES, ModelConfig

Array = jax.Array


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _init(std: float, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def apply_rope(x_btnh: Array, positions_bt: Array, theta: float) -> Array:
    """Rotary embedding in the "rotate half" layout of Hugging Face Llama (not interleaved pairs)."""
    half = x_btnh.shape[-1] // 2
    inv_freq = 1.0 / theta ** (np.arange(half, dtype=np.float32) * 2.0 / x_btnh.shape[-1])
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angles_bth)[:, :, None, :], jnp.cos(angles_bth)[:, :, None, :]
    x1, x2 = x_btnh[..., :half].astype(jnp.float32), x_btnh[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnh.dtype)


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
    common = dict(epsilon=cfg.norm_eps, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), name=name)
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(scale_init=_ones(("embed",)), **common)
    return nn.LayerNorm(use_bias=cfg.use_bias, scale_init=_ones(("embed",)), bias_init=_zeros(("embed",)), **common)


class Linear(nn.Module):
    """``x @ kernel (+ bias)`` contracting the last ``contract`` axes of x; the kernel has its real
    (unflattened) shape ``in_shape + features`` and logical names ``axes``."""

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    contract: int = 1
    use_bias: bool = False
    std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    out_dtype: str | None = None  # the matmul's output type (f32 logits from bf16 inputs); None: ``dtype``

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = x.shape[x.ndim - self.contract :]
        kernel = self.param("kernel", _init(self.std, self.axes), (*in_shape, *self.features), _dtype(self.param_dtype))
        x, kernel = x.astype(_dtype(self.dtype)), kernel.astype(_dtype(self.dtype))
        dims = ((tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract))), ((), ()))
        out_type = None if self.out_dtype is None else _dtype(self.out_dtype)
        y = jax.lax.dot_general(x, kernel, dims, preferred_element_type=out_type)
        if self.use_bias:
            bias_axes = self.axes[self.contract :]
            y = y + self.param("bias", _zeros(bias_axes), self.features, _dtype(self.param_dtype)).astype(y.dtype)
        return y


def _attention(q_btnh, k, v, mask_b1ts, dropout, kv_layout: str = "bskh"):
    """Softmax attention, scores and softmax in float32; keys/values in ``kv_layout`` ('bskh' as the
    projections produce them, or 'bksh' as the KV cache stores them).

    The N = K*G query heads attend in K groups of G, folded into the query axis ([B,K,G*T,H]), so both
    matmuls are plain [B,K]-batched ones and grouped-query attention never copies the keys. The
    softmax's division is deferred to the output (below). On CPU, forward and backward, this is faster
    than the division in place and than ``jax.nn.dot_product_attention``'s XLA path, which it matches
    to 2e-6 (docs/benchmarks.md has the measurements).
    """
    b, t, n, h = q_btnh.shape
    k_heads = k.shape[kv_layout.index("k")]
    g = n // k_heads
    q_bkqh = q_btnh.reshape(b, t, k_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k_heads, g * t, h)
    q_bkqh = q_bkqh * jnp.asarray(1 / np.sqrt(h), q_bkqh.dtype)  # 1/√H on q: fewer elements than the scores
    scores = jnp.einsum(f"bkqh,{kv_layout}->bkqs", q_bkqh, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, k_heads, g, t, -1)
    scores = jnp.where(mask_b1ts[:, :, None], scores, jnp.finfo(jnp.float32).min)
    # softmax(s) @ v as (exp(s - max) @ v) / Σ exp(s - max): the division scales the [.., T, H] output
    # instead of the [.., T, S] probabilities, and the backward pass reduces over H instead of S.
    unnormalised = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    inverse_total = 1.0 / unnormalised.sum(axis=-1).reshape(b, k_heads, g * t, 1)
    if dropout is not None:  # elementwise, so dropping before normalising equals dropping the probabilities
        unnormalised = dropout(unnormalised)
    unnormalised = unnormalised.reshape(b, k_heads, g * t, -1).astype(v.dtype)
    out = jnp.einsum(f"bkqs,{kv_layout}->bkqh", unnormalised, v, preferred_element_type=jnp.float32)
    out = (out * inverse_total).astype(v.dtype)
    return out.reshape(b, k_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# What the 'cudnn' path asks jax.nn.dot_product_attention for; tests/test_attention_paths.py sets 'xla' to run the
# path's whole plumbing on CPU.
_FUSED_IMPLEMENTATION = "cudnn"


def _fused_attention(q_btnh, k_bskh, v_bskh, mask_bt, implementation: str):
    """Causal attention by ``jax.nn.dot_product_attention`` over each row's first Σ mask keys, for a
    right-padded ``mask_bt`` (None: every key real). ``implementation='cudnn'`` on the GPU; the tests run this
    same argument construction with ``'xla'`` against ``_attention`` on CPU.

    For real queries this is ``_attention``'s mask exactly (a right-padded row's real keys are its first
    Σ mask). Pad queries see the row's real keys instead of those plus themselves; their outputs are
    meaningless either way. Lengths are at least 1 so an all-pad row (an eval batch's filler) still has one
    visible key and no fully masked softmax row, whatever the kernel does with one."""
    lengths_b = None if mask_bt is None else jnp.maximum(mask_bt.sum(axis=1, dtype=jnp.int32), 1)
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, is_causal=True, key_value_seq_lengths=lengths_b, implementation=implementation
    )


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, RoPE or none, and an optional KV-cache layer. With
    ``path='cudnn'`` the mask argument is the right-padded [B,T] token mask (or None: every token real) instead
    of the [B,1,T,S] attention mask."""

    cfg: ModelConfig
    deterministic: bool = True
    path: str = "xla"

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_b1ts, kv=None, index=None):
        cfg = self.cfg
        n, k, h = cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
        out_std = cfg.init_std / np.sqrt(2 * cfg.n_layers)  # GPT-2: scale residual projections by depth
        linear = functools.partial(Linear, dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=cfg.init_std)
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        q = linear((n, h), ("embed", "heads", "head_dim"), use_bias=qkv_bias, name="q")(x_btd)
        key = linear((k, h), ("embed", "kv_heads", "head_dim"), use_bias=qkv_bias, name="k")(x_btd)
        value = linear((k, h), ("embed", "kv_heads", "head_dim"), use_bias=qkv_bias, name="v")(x_btd)
        if cfg.positions == "rope":
            q = apply_rope(q, positions_bt, cfg.rope_theta)
            key = apply_rope(key, positions_bt, cfg.rope_theta)

        dropout = cfg.attention_dropout_rate > 0 and not self.deterministic
        new_kv = None
        if kv is not None:
            # The cache is stored [B,K,S,H] (heads before slots): the layout the score and value
            # matmuls read directly. A [B,S,K,H] cache cost a full transpose per layer per decode step.
            key = jax.lax.dynamic_update_slice(
                kv["k"], key.transpose(0, 2, 1, 3).astype(kv["k"].dtype), (0, 0, index, 0)
            )
            value = jax.lax.dynamic_update_slice(
                kv["v"], value.transpose(0, 2, 1, 3).astype(kv["v"].dtype), (0, 0, index, 0)
            )
            key = nn.with_logical_constraint(key, ("batch", "kv_heads", "length", "head_dim"))
            value = nn.with_logical_constraint(value, ("batch", "kv_heads", "length", "head_dim"))
            new_kv = {"k": key, "v": value}
            out = _attention(q, key.astype(q.dtype), value.astype(q.dtype), mask_b1ts, None, "bksh")
        elif self.path == "cudnn":  # attention_path refused cuDNN for dropout, so there is none here
            out = _fused_attention(q, key, value, mask_b1ts, _FUSED_IMPLEMENTATION)
        else:
            drop = nn.Dropout(cfg.attention_dropout_rate, deterministic=False) if dropout else None
            out = _attention(q, key, value, mask_b1ts, drop)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = linear(
            (cfg.d_model,), ("heads", "head_dim", "embed"), contract=2, use_bias=cfg.use_bias, std=out_std, name="o"
        )(out)
        return out, new_kv


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.cfg
        linear = functools.partial(Linear, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        up = functools.partial(linear, (cfg.d_ff,), ("embed", "mlp"), std=cfg.init_std)
        if cfg.mlp == "swiglu":
            hidden = nn.silu(up(name="wi_gate")(x_btd)) * up(name="wi_up")(x_btd)
        else:
            hidden = nn.gelu(up(name="wi")(x_btd))
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        out_std = cfg.init_std / np.sqrt(2 * cfg.n_layers)  # GPT-2: scale residual projections by depth
        return linear((cfg.d_model,), ("mlp", "embed"), std=out_std, name="wo")(hidden)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(Norm(x)), then + Mlp(Norm(x))."""

    cfg: ModelConfig
    deterministic: bool = True
    path: str = "xla"

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_b1ts, kv=None, index=None):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        attn_out, new_kv = Attention(cfg, self.deterministic, self.path, name="attn")(
            _norm(cfg, "attn_norm")(x_btd), positions_bt, mask_b1ts, kv, index
        )
        x_btd = x_btd + drop(attn_out)
        x_btd = x_btd + drop(Mlp(cfg, name="mlp")(_norm(cfg, "mlp_norm")(x_btd)))
        x_btd = nn.with_logical_constraint(x_btd, ("batch", "length", "embed"))
        return x_btd, new_kv


class Transformer(nn.Module):
    """The decoder. ``__call__`` returns logits [B,T,V] (head 'lm') or values [B,T] (head 'scalar'),
    always float32; with ``cache=`` it returns ``(output, new_cache)``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_bt: Array,
        mask_bt: Array | None = None,
        *,
        segment_ids_bt: Array | None = None,
        cache: Cache | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
        right_padded: bool = False,
    ):
        """``segment_ids_bt`` (packed pretraining, no cache): tokens attend only within their segment
        (id > 0; 0 is padding) and positions restart at each segment; it replaces ``mask_bt``.
        ``return_hidden``: return the final-norm hidden states [B,T,D] instead of the head's output
        (for ``losses.fused_lm_loss`` with ``unembedding(params, cfg)``, and for ``sampling``'s own
        head); with ``cache=`` still ``(hidden, new_cache)``. ``right_padded=True`` (no cache, no segments)
        promises that each row of ``mask_bt`` is 1s then 0s, which lets attention take cuDNN's fused kernel
        (``ModelConfig.attention_path``); the mask's values are not checked, so a left-padded mask with it
        attends to the wrong keys on that path."""
        cfg = self.cfg
        batch, length = tokens_bt.shape
        if right_padded and (cache is not None or segment_ids_bt is not None):
            raise ValueError("right_padded describes mask_bt of a full forward: not with a cache or segment_ids_bt")
        # The first that holds names the call's mask (model_config.MASK_KINDS); only causal and prefix suit cuDNN.
        kinds = {"cache": cache is not None, "segments": segment_ids_bt is not None, "causal": mask_bt is None}
        mask_kind = next((kind for kind, holds in kinds.items() if holds), "prefix" if right_padded else "general")
        path = cfg.attention_path(mask_kind, deterministic=deterministic)
        if segment_ids_bt is not None:
            if cache is not None or mask_bt is not None:
                raise ValueError("segment_ids_bt replaces mask_bt and cannot be used with a cache")
            mask_bt = segment_ids_bt > 0
        if mask_bt is None:
            mask_bt = jnp.ones((batch, length), jnp.bool_)
        mask_bt = mask_bt.astype(jnp.bool_)
        steps_bt = jnp.cumsum(mask_bt.astype(jnp.int32), axis=1)  # real tokens so far, this one included

        # Positions and the attention mask, in slot coordinates (the cache's slots, or this chunk's).
        same_segment_bts = None
        if segment_ids_bt is not None:
            t = jnp.arange(length)
            starts = jnp.concatenate(
                [jnp.ones((batch, 1), jnp.bool_), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1
            )
            positions_bt = t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
            key_mask_bs, index = mask_bt, 0
            same_segment_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
        elif cache is None:
            positions_bt = jnp.maximum(steps_bt - 1, 0)
            key_mask_bs, index = mask_bt, 0
        else:
            index = cache["index"]
            positions_bt = jnp.maximum(cache["next_pos"][:, None] + steps_bt - 1, 0)
            key_mask_bs = jax.lax.dynamic_update_slice(cache["mask"], mask_bt, (0, index))
        q_slot_t = index + jnp.arange(length)
        k_slot_s = jnp.arange(key_mask_bs.shape[1])
        causal_ts = k_slot_s[None, :] <= q_slot_t[:, None]
        itself_ts = k_slot_s[None, :] == q_slot_t[:, None]
        visible_bts = (
            key_mask_bs[:, None, :] if same_segment_bts is None else key_mask_bs[:, None, :] & same_segment_bts
        )
        mask_b1ts = (causal_ts & (visible_bts | itself_ts))[:, None]
        if path == "cudnn":  # the fused kernel takes causality as a flag and the padding as key lengths
            mask_b1ts = None if mask_kind == "causal" else mask_bt

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=_dtype(cfg.dtype),
            param_dtype=_dtype(cfg.param_dtype),
            embedding_init=_init(cfg.init_std, ("vocab", "embed")),
            name="embed",
        )
        x_btd = embed(tokens_bt)
        if cfg.positions == "learned":
            x_btd = x_btd + nn.Embed(
                cfg.max_len,
                cfg.d_model,
                dtype=_dtype(cfg.dtype),
                param_dtype=_dtype(cfg.param_dtype),
                embedding_init=_init(cfg.init_std / 2, ("length", "embed")),
                name="pos_embed",
            )(positions_bt)
        x_btd = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x_btd)
        x_btd = nn.with_logical_constraint(x_btd, ("batch", "length", "embed"))

        block = Block
        if cfg.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        layer_kv = None if cache is None else cache["layers"]
        if cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_btd, new_layer_kv = scanned(cfg, deterministic, path, name="layers")(
                x_btd, positions_bt, mask_b1ts, layer_kv, index
            )
        else:
            new_layer_kv = []
            for i in range(cfg.n_layers):
                kv = None if layer_kv is None else layer_kv[i]
                x_btd, kv = block(cfg, deterministic, path, name=f"layers_{i}")(
                    x_btd, positions_bt, mask_b1ts, kv, index
                )
                new_layer_kv.append(kv)
        x_btd = _norm(cfg, "final_norm")(x_btd)
        if return_hidden:
            if cfg.tie_embeddings:
                embed.attend(x_btd[:, :0])  # zero-width call: the head's params exist as in a normal init
            out = x_btd
        elif cfg.head == "scalar":
            # Reward/value head: the paper's RM projects to a scalar (§3.5, App. C); init N(0, 1/(d_model+1)),
            # as in Stiennon et al. 2020, App. B.1 (docs/references.md).
            head = Linear(
                (1,),
                ("embed", None),
                use_bias=True,
                std=1.0 / np.sqrt(cfg.d_model + 1),
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                name="score_head",
            )
            out = head(x_btd)[..., 0].astype(jnp.float32)
        elif cfg.tie_embeddings and cfg.dtype == "float32":
            out = embed.attend(x_btd)
        elif cfg.tie_embeddings:  # bf16 inputs, f32 logits: rounding them to bf16 flips near-tied greedy picks
            table = embed.embedding.astype(_dtype(cfg.dtype))
            out = jnp.einsum("btd,vd->btv", x_btd.astype(table.dtype), table, preferred_element_type=jnp.float32)
        else:
            head = Linear(
                (cfg.vocab_size,),
                ("embed", "vocab"),
                std=cfg.init_std,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                out_dtype=None if cfg.dtype == "float32" else "float32",
                name="lm_head",
            )
            out = head(x_btd).astype(jnp.float32)
        if cfg.head == "lm" and not return_hidden:
            out = nn.with_logical_constraint(out, ("batch", "length", "vocab"))

        if cache is None:
            return out
        new_cache = {
            "layers": new_layer_kv,
            "mask": key_mask_bs,
            "index": index + length,
            "next_pos": cache["next_pos"] + mask_bt.sum(axis=1, dtype=jnp.int32),
        }
        return out, new_cache


def unembedding(params: Any, cfg: ModelConfig) -> Array:
    """The [V, D] output projection of an lm-head model: the token embedding when tied. ``params`` as
    ``model.apply`` takes them, boxed (straight from ``init``) or not."""
    table = params["embed"]["embedding"] if cfg.tie_embeddings else params["lm_head"]["kernel"]
    table = nn.unbox(table)
    return table if cfg.tie_embeddings else table.T


def count_params(params: Any) -> int:
    """Number of scalars in a (possibly abstract or boxed) params tree."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    leaves = jax.tree.leaves(params, is_leaf=is_box)
    return sum(int(np.prod((x.value if is_box(x) else x).shape)) for x in leaves)

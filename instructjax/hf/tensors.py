"""Hugging Face tensors <-> our params: name/shape mapping and safetensors reading.

Every tensor is described by one ``_Map``: ours = ``hf.reshape(split)[pick].transpose(perm)``, possibly
zero-padded along the vocabulary. The same description drives both directions (``_Map.read`` on import,
``hf_tensors`` on export), so export is the exact inverse of import and a round trip is bit-exact.
``_entries`` lists every one of our arrays with its source; ``docs/hf.md`` has the full name mapping.

``_Checkpoint`` opens the ``*.safetensors`` files of a model directory (one file, or shards listed by
``model.safetensors.index.json``) lazily, and ``_Map.read`` reads only the block of a tensor that one
device needs (``safe_open(..., framework="numpy").get_slice``; bfloat16/float8 through a memory map), so
no full copy of a sharded model ever sits on one device or host. Only safetensors are read: a
pickle-only checkpoint (``pytorch_model.bin``) is refused, never unpickled, because unpickling runs
arbitrary code.

``_check`` validates every tensor before anything is read onto a device: present, of the shape
``config.json`` implies, of a float dtype (an integer or bool tensor, e.g. a quantized checkpoint, is an
error), and none left over. Tensors of different float dtypes are accepted and all cast to
``param_dtype``, as transformers casts a checkpoint to its ``torch_dtype`` (exporters legitimately keep
e.g. norms in float32 beside bfloat16 weights); the mix is logged as a warning naming the tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import pathlib
import re
import struct
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open

from instructjax.hf.config import _BASE_PREFIX, family_of
from instructjax.model import ModelConfig

log = logging.getLogger(__name__)

# Non-parameter buffers some exporters write (GPT-2's causal mask, old Llama's rotary frequencies).
_BUFFERS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "*.bin", "*.pt", "*.pth", "*.ckpt")
# safetensors' numpy backend cannot build these; they are read through a memory map instead.
_ML_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_FLOAT_DTYPES = {"F16", "F32", "F64", *_ML_DTYPES}


# --------------------------------------------------------------------------------------------- mapping


@dataclasses.dataclass(frozen=True)
class _Map:
    """One HF tensor -> one of our arrays: ``hf.reshape(split dims)``, fix the ``pick``ed split dims,
    then ``transpose(perm)`` of the remaining ones. ``split`` lists each HF dim's factors; ``pick`` has
    one entry per factor (an index or None); ``perm[j]`` is the kept factor that becomes our dim j."""

    name: str
    split: tuple[tuple[int, ...], ...]
    pick: tuple[int | None, ...]
    perm: tuple[int, ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(f) for f in self.split)

    @property
    def shape(self) -> tuple[int, ...]:
        """Our shape before any vocabulary padding."""
        kept = [n for n, p in zip(self._factors, self.pick, strict=True) if p is None]
        return tuple(kept[k] for k in self.perm)

    @property
    def _factors(self) -> tuple[int, ...]:
        return tuple(n for f in self.split for n in f)

    def read(self, ckpt: _Checkpoint, index: tuple[slice, ...], dtype: Any) -> np.ndarray:
        """Our array's block ``index`` (slices of our possibly padded shape), reading only what it needs."""
        out = np.zeros(tuple(s.stop - s.start for s in index), dtype)
        clipped = [slice(s.start, min(s.stop, n)) for s, n in zip(index, self.shape, strict=True)]
        if any(c.stop <= c.start for c in clipped):
            return out  # entirely in the vocabulary padding
        kept_ranges: list[slice] = [slice(0)] * len(self.perm)
        for j, c in enumerate(clipped):
            kept_ranges[self.perm[j]] = c
        ranges, k = [], 0
        for p in self.pick:
            if p is None:
                ranges.append(kept_ranges[k])
                k += 1
            else:
                ranges.append(slice(p, p + 1))
        # Per HF dim: leading factors fixed to one index give an offset; the first wider factor is read
        # as one contiguous range; the factors after it are sliced after the read.
        hf_slices, block_shape, post, r = [], [], [], 0
        for factors in self.split:
            rs = ranges[r : r + len(factors)]
            r += len(factors)
            strides = [math.prod(factors[i + 1 :]) for i in range(len(factors))]
            lead, offset = 0, 0
            while lead < len(factors) - 1 and rs[lead].stop - rs[lead].start == 1:
                offset += rs[lead].start * strides[lead]
                lead += 1
            start = offset + rs[lead].start * strides[lead]
            hf_slices.append(slice(start, start + (rs[lead].stop - rs[lead].start) * strides[lead]))
            block_shape += [1] * lead + [rs[lead].stop - rs[lead].start, *factors[lead + 1 :]]
            post += [slice(None)] * (lead + 1) + list(rs[lead + 1 :])
        block = ckpt.read(self.name, tuple(hf_slices)).reshape(block_shape)[tuple(post)]
        block = block[tuple(0 if p is not None else slice(None) for p in self.pick)].transpose(self.perm)
        out[tuple(slice(0, c.stop - c.start) for c in clipped)] = block
        return out


class _Entry(NamedTuple):
    """Where one of our arrays (or one layer of a stacked array) comes from: a tensor, or a constant."""

    path: str
    layer: int | None
    source: _Map | np.ndarray


def _linear(name: str, hf_dims: Sequence[Sequence[int]], perm: Sequence[int]) -> _Map:
    split = tuple(tuple(d) for d in hf_dims)
    return _Map(name, split, (None,) * sum(len(d) for d in split), tuple(perm))


def _layer_maps(cfg: ModelConfig, family: str, pre: str) -> dict[str, _Map]:
    """Our names inside one block -> HF tensors (``pre`` is the HF prefix of the block)."""
    d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.d_ff
    maps: dict[str, _Map] = {}
    if family == "gpt2":  # Conv1D weights are [in, out]: no transpose
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            maps[f"{ours}/scale"] = _linear(f"{pre}{theirs}.weight", [[d]], [0])
            maps[f"{ours}/bias"] = _linear(f"{pre}{theirs}.bias", [[d]], [0])
        for i, proj in enumerate("qkv"):  # fused c_attn: columns [q | k | v], each [N, H]
            c_attn = ((d,), (3, n, h))
            maps[f"attn/{proj}/kernel"] = _Map(f"{pre}attn.c_attn.weight", c_attn, (None, i, None, None), (0, 1, 2))
            maps[f"attn/{proj}/bias"] = _Map(f"{pre}attn.c_attn.bias", ((3, n, h),), (i, None, None), (0, 1))
        maps["attn/o/kernel"] = _linear(f"{pre}attn.c_proj.weight", [[n, h], [d]], [0, 1, 2])
        maps["attn/o/bias"] = _linear(f"{pre}attn.c_proj.bias", [[d]], [0])
        maps["mlp/wi/kernel"] = _linear(f"{pre}mlp.c_fc.weight", [[d], [f]], [0, 1])
        maps["mlp/wi/bias"] = _linear(f"{pre}mlp.c_fc.bias", [[f]], [0])
        maps["mlp/wo/kernel"] = _linear(f"{pre}mlp.c_proj.weight", [[f], [d]], [0, 1])
        maps["mlp/wo/bias"] = _linear(f"{pre}mlp.c_proj.bias", [[d]], [0])
        return maps
    # Llama family: nn.Linear weights are [out, in]
    maps["attn_norm/scale"] = _linear(f"{pre}input_layernorm.weight", [[d]], [0])
    maps["mlp_norm/scale"] = _linear(f"{pre}post_attention_layernorm.weight", [[d]], [0])
    for proj, heads in (("q", n), ("k", k), ("v", k)):
        maps[f"attn/{proj}/kernel"] = _linear(f"{pre}self_attn.{proj}_proj.weight", [[heads, h], [d]], [2, 0, 1])
        if cfg.use_bias or cfg.qkv_bias:
            maps[f"attn/{proj}/bias"] = _linear(f"{pre}self_attn.{proj}_proj.bias", [[heads, h]], [0, 1])
    maps["attn/o/kernel"] = _linear(f"{pre}self_attn.o_proj.weight", [[d], [n, h]], [1, 2, 0])
    for ours, theirs in (("wi_gate", "gate_proj"), ("wi_up", "up_proj")):
        maps[f"mlp/{ours}/kernel"] = _linear(f"{pre}mlp.{theirs}.weight", [[f], [d]], [1, 0])
    maps["mlp/wo/kernel"] = _linear(f"{pre}mlp.down_proj.weight", [[d], [f]], [1, 0])
    if cfg.use_bias:
        maps["attn/o/bias"] = _linear(f"{pre}self_attn.o_proj.bias", [[d]], [0])
        for ours, theirs, size in (("wi_gate", "gate_proj", f), ("wi_up", "up_proj", f), ("wo", "down_proj", d)):
            maps[f"mlp/{ours}/bias"] = _linear(f"{pre}mlp.{theirs}.bias", [[size]], [0])
    return maps


def _entries(cfg: ModelConfig, family: str, prefix: str, vocab: int, reward_offset: float) -> list[_Entry]:
    """Every one of our arrays and its source, for ``cfg`` read from / written to HF ``family``."""
    d = cfg.d_model
    gpt2 = family == "gpt2"
    embed = f"{prefix}wte.weight" if gpt2 else f"{prefix}embed_tokens.weight"
    entries = [_Entry("embed/embedding", None, _linear(embed, [[vocab], [d]], [0, 1]))]
    if gpt2:
        entries.append(
            _Entry("pos_embed/embedding", None, _linear(f"{prefix}wpe.weight", [[cfg.max_len], [d]], [0, 1]))
        )
    block = "h" if gpt2 else "layers"
    for i in range(cfg.n_layers):
        for ours, m in _layer_maps(cfg, family, f"{prefix}{block}.{i}.").items():
            entries.append(_Entry(f"layers/{ours}", i, m) if cfg.scan_layers else _Entry(f"layers_{i}/{ours}", None, m))
    final = f"{prefix}ln_f" if gpt2 else f"{prefix}norm"
    entries.append(_Entry("final_norm/scale", None, _linear(f"{final}.weight", [[d]], [0])))
    if gpt2:
        entries.append(_Entry("final_norm/bias", None, _linear(f"{final}.bias", [[d]], [0])))
    if cfg.head == "scalar":
        entries.append(_Entry("score_head/kernel", None, _linear("score.weight", [[1], [d]], [1, 0])))
        entries.append(_Entry("score_head/bias", None, np.array([reward_offset], np.float64)))
    elif not cfg.tie_embeddings:
        entries.append(_Entry("lm_head/kernel", None, _linear("lm_head.weight", [[vocab], [d]], [1, 0])))
    return entries


# ------------------------------------------------------------------------------------------ checkpoint


def _safetensors_header(path: pathlib.Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return {"__size__": size, **json.loads(f.read(size))}


def _read_json_object(path: pathlib.Path) -> dict[str, Any]:
    """A JSON file holding one object; anything else is an error naming the file."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object (got {type(value).__name__})")
    return value


def _read_index(index_file: pathlib.Path) -> dict[str, pathlib.Path]:
    """``model.safetensors.index.json``'s ``weight_map`` (tensor -> shard path); every shard must exist."""
    weight_map = _read_json_object(index_file).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_file}: no 'weight_map' object (tensor name -> shard file), not a safetensors index")
    shards: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        shards.setdefault(str(file), []).append(name)
    for file, names in shards.items():
        if not (index_file.parent / file).is_file():
            others = f" and {len(names) - 1} other tensor(s)" if len(names) > 1 else ""
            raise FileNotFoundError(
                f"{index_file}: shard {file} does not exist (it should hold tensor {names[0]!r}{others})"
            )
    return {name: index_file.parent / str(file) for name, file in weight_map.items()}


class _Checkpoint:
    """The safetensors files of a HF model directory, opened lazily; errors name the file and tensor."""

    def __init__(self, directory: str | pathlib.Path):
        self.dir = pathlib.Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: not a directory")
        config_file = self.dir / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file}: missing (a Hugging Face model directory has one)")
        self.config = _read_json_object(config_file)
        index_file = self.dir / "model.safetensors.index.json"
        self._stack = contextlib.ExitStack()
        self._handles: dict[pathlib.Path, Any] = {}
        self._headers: dict[pathlib.Path, dict] = {}
        self.weight_map: dict[str, pathlib.Path] = {}
        if index_file.exists():
            self.index = index_file
            self.weight_map = _read_index(index_file)
            return
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            pickles = sorted({p.name for pattern in _PICKLES for p in self.dir.glob(pattern)})
            if pickles:
                raise ValueError(
                    f"{self.dir / pickles[0]}: only pickle checkpoints ({', '.join(pickles)}) found; refusing to "
                    "unpickle (it can run arbitrary code). Convert them to safetensors first"
                )
            raise FileNotFoundError(f"{self.dir}: no *.safetensors file and no model.safetensors.index.json")
        self.index = files[0] if len(files) == 1 else self.dir
        try:
            for path in files:
                for name in self._handle(path).keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name in self.weight_map:
                        raise ValueError(f"{path}: tensor {name!r} is also in {self.weight_map[name].name}")
                    self.weight_map[name] = path
        except Exception:
            self.close()
            raise

    def _handle(self, path: pathlib.Path) -> Any:
        if path not in self._handles:
            try:
                self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="numpy"))
            except Exception as e:
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        return self._handles[path]

    def where(self, name: str) -> str:
        path = self.weight_map.get(name)
        return str(path if path is not None else self.index)

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """``(shape, safetensors dtype)`` of a tensor; a missing tensor is an error naming the file."""
        if name not in self.weight_map:
            raise KeyError(f"{self.index}: tensor {name!r} is missing")
        try:
            sl = self._handle(self.weight_map[name]).get_slice(name)
        except Exception as e:
            raise KeyError(f"{self.weight_map[name]}: tensor {name!r} is listed but cannot be read ({e})") from e
        return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
        """A block of a tensor; only the bytes of ``slices`` are read."""
        path = self.weight_map[name]
        shape, dtype = self.meta(name)
        if dtype in _ML_DTYPES:  # numpy cannot name bfloat16: map the bytes with ml_dtypes
            if path not in self._headers:
                self._headers[path] = _safetensors_header(path)
            header = self._headers[path]
            begin = 8 + header["__size__"] + header[name]["data_offsets"][0]
            mapped = np.memmap(path, dtype=_ML_DTYPES[dtype], mode="r", offset=begin, shape=shape)
            return np.array(mapped[slices])
        return self._handle(path).get_slice(name)[slices]

    def close(self) -> None:
        self._stack.close()


def _check(ckpt: _Checkpoint, entries: Sequence[_Entry], cfg: ModelConfig) -> None:
    """Every tensor the model needs exists with the right shape and a float dtype; nothing is left over.
    Float dtypes may differ between tensors (e.g. float32 norms beside bfloat16 weights): every tensor is
    cast to ``cfg.param_dtype``, as transformers casts to ``torch_dtype``, and the mix is logged."""
    used: dict[str, str] = {}  # tensor -> safetensors dtype
    for e in entries:
        if not isinstance(e.source, _Map):
            continue
        shape, dtype = ckpt.meta(e.source.name)
        used[e.source.name] = dtype
        if shape != e.source.hf_shape:
            raise ValueError(
                f"{ckpt.where(e.source.name)}: tensor {e.source.name!r} has shape {shape}, expected "
                f"{e.source.hf_shape} from config.json (for our {e.path})"
            )
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{ckpt.where(e.source.name)}: tensor {e.source.name!r} has dtype {dtype}, not a float dtype "
                f"({', '.join(sorted(_FLOAT_DTYPES))}) for our {e.path} (a quantized checkpoint? dequantize it first)"
            )
    ignored = {"lm_head.weight"} if cfg.tie_embeddings and cfg.head == "lm" else set()
    extra = sorted(n for n in ckpt.weight_map if n not in used and n not in ignored and not _BUFFERS.search(n))
    if extra:
        shown = ", ".join(f"{n!r} ({ckpt.weight_map[n].name})" for n in extra[:5])
        raise ValueError(
            f"{ckpt.index}: {len(extra)} unexpected tensor(s) the model has no place for: {shown}"
            f"{' ...' if len(extra) > 5 else ''} (config.json and the weights disagree?)"
        )
    _log_mixed_dtypes(ckpt, used, cfg.param_dtype)


def _log_mixed_dtypes(ckpt: _Checkpoint, dtypes: dict[str, str], param_dtype: str) -> None:
    """Warn, naming the tensors, when a checkpoint's float dtypes differ (all are cast to ``param_dtype``)."""
    by_dtype: dict[str, list[str]] = {}
    for name, dtype in dtypes.items():
        by_dtype.setdefault(dtype, []).append(name)
    if len(by_dtype) < 2:
        return
    ranked = sorted(by_dtype.items(), key=lambda kv: -len(kv[1]))
    shown = "; ".join(
        f"{dtype}: {len(names)} tensor(s) ({', '.join(repr(n) for n in names[:3])}{' ...' if len(names) > 3 else ''})"
        for dtype, names in ranked
    )
    log.warning("%s: tensors have mixed dtypes (%s); all are cast to param_dtype=%s", ckpt.index, shown, param_dtype)


def _prefix(names: Any, family: str) -> str:
    base = _BASE_PREFIX[family]
    embed = "wte.weight" if family == "gpt2" else "embed_tokens.weight"
    return base if f"{base}{embed}" in names else ""


# ------------------------------------------------------------------------------------------------ export


def _to_host(x: Any) -> np.ndarray:
    """The full value of a (possibly sharded, possibly multi-host) array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _leaf(params: Any, path: str) -> Any:
    node = params
    for key in path.split("/"):
        if key not in node:
            raise KeyError(f"params have no {path} (the model config and the params disagree)")
        node = node[key]
    return node


def hf_tensors(
    params: Any, cfg: ModelConfig, model_type: str | None = None, *, vocab_size: int | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """``(HF name, array)`` for every tensor of the export of ``params``, one at a time (gathered to host)."""
    family = model_type or family_of(cfg)
    vocab = cfg.vocab_size if vocab_size is None else vocab_size
    entries = _entries(cfg, family, _BASE_PREFIX[family], vocab, 0.0)
    groups: dict[str, list[_Entry]] = {}
    for e in entries:
        if isinstance(e.source, _Map):
            groups.setdefault(e.source.name, []).append(e)
    for name, group in groups.items():
        m0 = group[0].source
        full = None
        for e in group:
            x = _leaf(params, e.path)
            x = _to_host(x if e.layer is None else x[e.layer])
            x = x[tuple(slice(0, n) for n in e.source.shape)]  # drop vocabulary padding
            kept = x.transpose(np.argsort(e.source.perm))
            if full is None:
                full = np.zeros(tuple(n for f in m0.split for n in f), x.dtype)
            full[tuple(p if p is not None else slice(None) for p in e.source.pick)] = kept
        yield name, full.reshape(m0.hf_shape)

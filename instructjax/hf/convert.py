"""Hugging Face model directories <-> our params and stage workdirs.

``load_hf`` reads a model directory onto the params' target shardings: each parameter is built with
``jax.make_array_from_callback`` and each device's callback reads only its own slice
(``instructjax.hf.tensors``). ``export_hf`` writes params as a transformers directory (``config.json``
plus safetensors, sharded with an index above ``max_shard_size``), gathering one tensor at a time to
host; only process 0 writes. ``import_to_workdir`` / ``export_workdir`` convert whole stage workdirs
(``scripts/convert_hf.py``), copying the tokenizer files (``copy_tokenizer``) along.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from instructjax import checkpoint, sharding, stage
from instructjax.hf.config import _BASE_PREFIX, HFModelInfo, config_from_hf, config_to_hf, family_of
from instructjax.hf.tensors import _check, _Checkpoint, _entries, _Entry, _Map, _prefix, _to_host, hf_tensors
from instructjax.model import ModelConfig, Transformer
from instructjax.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ import


class HFModel(NamedTuple):
    """What ``load_hf`` returns."""

    cfg: ModelConfig
    params: Any  # plain pytree of jax arrays on the target shardings
    info: HFModelInfo


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _normalise(index: Any, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def _tqdm(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="tensor", dynamic_ncols=True)


def _tokenizer_file(source: pathlib.Path) -> pathlib.Path:
    """The file ``load_tokenizer(source)`` reads, for messages."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if source.is_dir() and (source / name).exists():
            return source / name
    return source


def _check_tokenizer(where: pathlib.Path, tok: Tokenizer, embed: _Entry, rows: int, min_vocab_size: int) -> None:
    """Every id of ``tok`` but an added PAD id (its last id, which gets a zero row) must have one of the
    embedding's ``rows``: a tokenizer with more real tokens (beyond ``min_vocab_size``) is another model's."""
    real = tok.vocab_size - 1 if tok.pad_id == tok.vocab_size - 1 else tok.vocab_size
    if real > max(rows, min_vocab_size):
        name = embed.source.name if isinstance(embed.source, _Map) else embed.path
        raise ValueError(
            f"{where}: tokenizer has {tok.vocab_size} tokens but the embedding {name!r} has {rows} rows "
            f"(vocab_size in config.json): likely the wrong tokenizer (one of another model). To give tokens "
            f"added on purpose zero rows, pass min_vocab_size={real}"
        )


def load_hf(
    directory: str | pathlib.Path,
    mesh: Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    *,
    pad_vocab_to_multiple: int = 1,
    min_vocab_size: int = 0,
    scan_layers: bool = False,
    dtype: str = "float32",
    param_dtype: str = "float32",
    tokenizer: str | pathlib.Path | None = None,
    progress: bool = False,
) -> HFModel:
    """A HF model directory as ``(ModelConfig, params, HFModelInfo)``, params placed on ``mesh``
    (default: one device) by ``rules``; each device reads only its slice of each tensor.

    ``pad_vocab_to_multiple``: round the vocabulary up (zero rows) so it divides the mesh's tensor axis;
    ``min_vocab_size``: at least this many rows (a tokenizer's ``vocab_size`` when it adds a PAD id).
    ``param_dtype`` is the storage dtype: every tensor is cast to it, so a checkpoint mixing float dtypes
    (float32 norms beside bfloat16 weights) loads, with a warning naming them; an integer or bool tensor is
    an error. ``dtype`` is the compute dtype of the config.
    ``tokenizer``: the tokenizer (file or directory) the model will be used with; the vocabulary is raised
    to its ``vocab_size`` (an added PAD id gets a zero row), and a tokenizer with more real tokens than
    the embedding has rows (likely another model's) is an error.
    Every check (files, config, tensor names/shapes/dtypes, tokenizer) runs before any tensor is read.
    """
    if mesh is None:
        mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tokenizer_file = None if tokenizer is None else _tokenizer_file(pathlib.Path(tokenizer))
    tok = None if tokenizer_file is None else load_tokenizer(tokenizer_file)
    ckpt = _Checkpoint(directory)
    try:
        cfg, info = config_from_hf(
            ckpt.config,
            pad_vocab_to_multiple=pad_vocab_to_multiple,
            min_vocab_size=max(min_vocab_size, tok.vocab_size if tok else 0),
            scan_layers=scan_layers,
            dtype=dtype,
            param_dtype=param_dtype,
            where=str(ckpt.dir / "config.json"),
        )
        prefix = _prefix(ckpt.weight_map, info.model_type)
        entries = _entries(cfg, info.model_type, prefix, info.vocab_size, info.reward_offset or 0.0)
        _check(ckpt, entries, cfg)
        if tokenizer_file is not None and tok is not None:  # entries[0] is the embedding
            _check_tokenizer(tokenizer_file, tok, entries[0], info.vocab_size, min_vocab_size)
        shapes, shardings = sharding.model_shardings(Transformer(cfg), mesh, rules)
        by_path: dict[str, list[_Entry]] = {}
        for e in entries:
            by_path.setdefault(e.path, []).append(e)
        flat_shapes = {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
        if set(flat_shapes) != set(by_path):
            raise AssertionError(f"hf mapping out of date: {sorted(set(flat_shapes) ^ set(by_path))}")

        def build(path_str: str, shaped: jax.ShapeDtypeStruct, sh: jax.sharding.Sharding) -> jax.Array:
            group = by_path[path_str]

            def one(source: _Map | np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
                if isinstance(source, np.ndarray):
                    return source[index].astype(shaped.dtype)
                return source.read(ckpt, index, shaped.dtype)

            def callback(index: Any) -> np.ndarray:
                index = _normalise(index, shaped.shape)
                if group[0].layer is None:
                    return one(group[0].source, index)
                rows = [one(group[layer].source, index[1:]) for layer in range(index[0].start, index[0].stop)]
                return np.stack(rows)

            return jax.make_array_from_callback(shaped.shape, sh, callback)

        leaves = []
        paths = [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes)]
        shards = jax.tree.leaves(shardings)
        todo = zip(paths, jax.tree.leaves(shapes), shards, strict=True)
        for path_str, shaped, sh in _tqdm(todo, len(paths), "import", progress):
            leaves.append(build(path_str, shaped, sh))
        params = jax.tree.unflatten(jax.tree.structure(shapes), leaves)
    finally:
        ckpt.close()
    return HFModel(cfg, params, info)


# ------------------------------------------------------------------------------------------------ export


def _np_dtype(name: str) -> Any:
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _shard_plan(names_sizes: Sequence[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in names_sizes:
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def copy_tokenizer(source: str | pathlib.Path, out_dir: str | pathlib.Path) -> list[str]:
    """Copy the tokenizer files of ``source`` (a directory, or a tokenizer file) into ``out_dir``."""
    source, out_dir = pathlib.Path(source), pathlib.Path(out_dir)
    if source.is_file():
        files = [source] + [source.parent / n for n in TOKENIZER_FILES if n != source.name]
    else:
        files = [source / n for n in TOKENIZER_FILES]
    copied = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        if f.is_file():
            shutil.copyfile(f, out_dir / f.name)
            copied.append(f.name)
    return copied


def export_hf(
    params: Any,
    cfg: ModelConfig,
    out_dir: str | pathlib.Path,
    *,
    model_type: str | None = None,
    vocab_size: int | None = None,
    reward_bias: float = 0.0,
    token_ids: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    max_shard_size: int = 4 << 30,
    tokenizer: str | pathlib.Path | None = None,
    progress: bool = False,
) -> pathlib.Path:
    """Write ``params`` as a transformers model directory (``config.json`` + safetensors, sharded with an
    index above ``max_shard_size`` bytes) that ``AutoModelForCausalLM`` loads, or, for a scalar head,
    ``AutoModelForSequenceClassification`` (one label; see the package docstring for the reward offset).

    ``model_type``: the family to write (default: the one ``cfg`` is; a llama-shaped config can also be
    written as mistral). ``vocab_size``: rows to keep (drops import padding). ``reward_bias`` is
    subtracted from the reward: ``instructjax_reward_offset = score_head bias - reward_bias``.
    ``token_ids``: ``bos_token_id``/``eos_token_id``/``pad_token_id`` for ``config.json`` (a reward
    model needs ``pad_token_id``). ``tokenizer``: a tokenizer file or directory to copy alongside.
    Only process 0 writes; every process must call it (gathering a sharded array is collective).
    """
    out_dir = pathlib.Path(out_dir)
    family = model_type or family_of(cfg)
    offset = 0.0
    if cfg.head == "scalar":
        offset = float(_to_host(params["score_head"]["bias"])[0]) - float(reward_bias)
        if (token_ids or {}).get("pad_token_id") is None:
            log.warning("reward model exported without pad_token_id: transformers then scores batches of one only")
    hf_config = config_to_hf(cfg, family, vocab_size=vocab_size, reward_offset=offset, token_ids=token_ids, dtype=dtype)
    np_dtype = _np_dtype(dtype)
    entries = _entries(cfg, family, _BASE_PREFIX[family], hf_config["vocab_size"], 0.0)
    sizes: dict[str, int] = {}
    for e in entries:
        if isinstance(e.source, _Map):
            sizes[e.source.name] = math.prod(e.source.hf_shape) * np.dtype(np_dtype).itemsize
    shards = _shard_plan(list(sizes.items()), max_shard_size)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tensors = hf_tensors(params, cfg, family, vocab_size=hf_config["vocab_size"])
    bar = _tqdm(tensors, len(sizes), "export", progress and writer)
    weight_map, shard_i, pending = {}, 0, {}
    for name, array in bar:
        pending[name] = np.ascontiguousarray(array.astype(np_dtype))
        if len(pending) == len(shards[shard_i]):
            if writer:
                save_file(pending, str(out_dir / files[shard_i]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(pending, files[shard_i]))
            shard_i, pending = shard_i + 1, {}
    if writer and len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if writer and tokenizer is not None:
        copy_tokenizer(tokenizer, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------ stage workdirs


def _mesh(shape: Sequence[int]) -> Mesh:
    """A mesh of ``shape``; a shape without -1 that needs fewer devices than there are uses the first ones
    (converting a small model on a big host should not fail for want of a fill axis)."""
    shape = tuple(int(s) for s in shape)
    devices = jax.devices()
    if -1 not in shape and math.prod(shape) < len(devices):
        devices = devices[: math.prod(shape)]
    return sharding.make_mesh(shape, devices=devices)


def _usable_tokenizer(hf_dir: pathlib.Path) -> pathlib.Path | None:
    """``hf_dir`` when ``load_tokenizer`` reads a tokenizer there, else None (with a warning)."""
    try:
        load_tokenizer(hf_dir)
    except (ValueError, FileNotFoundError) as e:
        log.warning("%s: tokenizer not usable by instructjax (%s); vocabulary not padded for it", hf_dir, e)
        return None
    return hf_dir


def import_to_workdir(
    hf_dir: str | pathlib.Path,
    workdir: str | pathlib.Path,
    *,
    mesh_shape: Sequence[int] = (1, -1, 1),
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    pad_vocab_to_multiple: int = 1,
    min_vocab_size: int | None = None,
    scan_layers: bool = False,
    dtype: str = "float32",
    param_dtype: str = "float32",
    progress: bool = False,
) -> dict[str, Any]:
    """A HF model as a stage workdir: ``config.json`` (model, mesh, rules, tokenizer, the HF facts) and
    ``checkpoints/0/params`` (orbax), which ``checkpoint.load_params`` (``init_from``) and
    ``stage.load_stage`` read. The tokenizer files are copied to ``workdir/tokenizer``.

    The vocabulary is at least the tokenizer's ``vocab_size`` when ``load_tokenizer`` reads it, so an
    added PAD id has its embedding row (the training stages require model vocab >= tokenizer vocab); a
    tokenizer with more real tokens than the embedding has rows is refused (``load_hf``), unless
    ``min_vocab_size`` asks for that many rows."""
    hf_dir, workdir = pathlib.Path(hf_dir).absolute(), pathlib.Path(workdir).absolute()
    if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
        raise FileExistsError(f"{workdir / 'checkpoints'} already holds checkpoints: convert into an empty workdir")
    mesh = _mesh(mesh_shape)
    cfg, params, info = load_hf(
        hf_dir,
        mesh,
        rules,
        pad_vocab_to_multiple=pad_vocab_to_multiple,
        min_vocab_size=min_vocab_size or 0,
        scan_layers=scan_layers,
        dtype=dtype,
        param_dtype=param_dtype,
        tokenizer=_usable_tokenizer(hf_dir),
        progress=progress,
    )
    tokenizer = ""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        if copy_tokenizer(hf_dir, workdir / "tokenizer"):
            tokenizer = str(workdir / "tokenizer")
    config = {
        "stage": "hf_import",
        "model": dataclasses.asdict(cfg),
        "mesh_shape": list(mesh_shape),
        "rules": [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in rules],
        "seed": 0,
        "init_from": "",
        "data": {"world_dir": "", "tokenizer": tokenizer, "prompt_template": "{prompt}"},
        "hf": {"source": str(hf_dir), **info.to_dict()},
    }
    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True)
    with ocp.CheckpointManager(workdir / "checkpoints", options=options) as manager:
        manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        manager.wait_until_finished()
    if jax.process_index() == 0:
        stage.write_config(workdir, config)
    return config


def export_workdir(
    workdir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    best: bool = False,
    step: int | None = None,
    reward_bias: float | None = None,
    model_type: str | None = None,
    dtype: str = "float32",
    max_shard_size: int = 4 << 30,
    mesh_shape: Sequence[int] | None = None,
    progress: bool = False,
) -> pathlib.Path:
    """Export a stage workdir's params (latest step, ``step``, or ``best``) as a transformers directory,
    with its tokenizer. An imported workdir's ``hf`` section supplies the original family, vocabulary
    size and special-token ids; ids it lacks come from the tokenizer (whose added PAD id, if any, keeps
    its vocabulary row). ``reward_bias=None``: a reward model's ``reward_bias.json`` (written by the RM
    stage for its best checkpoint: export that one with ``best=True``), or 0 without one."""
    workdir = pathlib.Path(workdir)
    config = stage.read_config(workdir).to_dict()
    cfg = ModelConfig.from_dict(config["model"])
    mesh = _mesh(mesh_shape or config.get("mesh_shape", (1, -1, 1)))
    rules = sharding.as_rules(config.get("rules", sharding.DEFAULT_RULES))
    shapes, shardings = sharding.model_shardings(Transformer(cfg), mesh, rules)
    params = checkpoint.load_params(workdir, shapes, shardings, step=step, best=best)
    if reward_bias is None:
        bias_file = workdir / "reward_bias.json"
        reward_bias = float(json.loads(bias_file.read_text())["bias"]) if bias_file.exists() else 0.0
        if cfg.head == "scalar":
            log.warning("reward model: subtracting reward_bias=%s (%s)", reward_bias, bias_file)
    hf = config.get("hf") or {}
    token_ids = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    data = config.get("data") or {}
    tokenizer = data.get("tokenizer") or None
    if not tokenizer and data.get("world_dir"):
        tokenizer = str(pathlib.Path(data["world_dir"]) / "tokenizer.json")
    if tokenizer and pathlib.Path(tokenizer).exists():
        tok = load_tokenizer(tokenizer)
        from_tokenizer = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        token_ids = {k: from_tokenizer[k] if v is None else v for k, v in token_ids.items()}
    else:
        tokenizer = None
    vocab = hf.get("vocab_size") or cfg.vocab_size
    ids = [i for v in token_ids.values() for i in (v if isinstance(v, list) else [v]) if i is not None]
    if ids and max(ids) >= vocab:  # an added PAD id in the padding rows: keep its row
        log.warning("keeping %d vocabulary rows (not %d) so token id %d exists", max(ids) + 1, vocab, max(ids))
        vocab = min(max(ids) + 1, cfg.vocab_size)
    return export_hf(
        params,
        cfg,
        out_dir,
        model_type=model_type or hf.get("model_type"),
        vocab_size=vocab,
        reward_bias=reward_bias,
        token_ids=token_ids,
        dtype=dtype,
        max_shard_size=max_shard_size,
        tokenizer=tokenizer,
        progress=progress,
    )

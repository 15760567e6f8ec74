"""The stage workdir contract: what a stage writes, where it finds its data, and how another stage reads it.

A stage workdir (``train_sft``, ``train_rm``, ``train_ppo``, or an imported Hugging Face model) holds:

- ``config.json``: the stage's whole config; its ``model`` and ``data`` sections are what ``load_stage`` needs
  to rebuild the model and find the tokenizer (a PPO workdir copies them from its policy's stage);
- ``checkpoints/<step>/`` and ``best/`` (``checkpoint.py``), ``metrics.jsonl`` and ``tb/`` (``metrics.py``);
- ``summary.json``: written at the end; ``status`` is ``done`` once the stage finished (the pipeline skips it);
- ``.lock``: present while a run has the workdir open (``workdir_lock.py``: one run per workdir).

Workdirs travel. The paths a stage depends on (``PATH_KEYS``: its data directory, tokenizer, TFDS cache and
the stages it starts from) are written into ``config.json`` relative to the workdir when they lie in the same
job directory (the workdir's parent: the pipeline's sibling stages and world), else absolute; the workdir's
own absolute path is written too (``written_in``). ``read_config`` resolves them against wherever the workdir
is now, so a finished job moved to another directory, or used from another working directory, still loads;
a path that resolves nowhere falls back to where it was when the stage ran.

A stage's data settings name a data directory (``data.world_dir``: the synthetic world or your jsonl files),
a tokenizer (``data.tokenizer``; default ``<world_dir>/tokenizer.json``) and a TFDS cache (``data.cache_dir``;
default ``<world_dir>/tfds``). The data is the synthetic world when ``world.json`` is beside it: only then is
there a gold score.

``open_stage`` and ``close_stage`` are the first and last section of every stage's ``train()``, inside
``with workdir_lock.hold(workdir):`` (a second launch on a workdir a live run holds is refused);
``load_stage`` and ``sample_texts`` are how evaluation, the scripts and later stages read a finished one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from instructjax import checkpoint, sampling, sharding
from instructjax.model import ModelConfig, Transformer
from instructjax.tokenizer import Tokenizer, load_tokenizer

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
TOKENIZER_FILE = "tokenizer.json"  # the default tokenizer, inside the data directory
TFDS_DIR = "tfds"  # the default TFDS cache, inside the data directory
WORLD_FILE = "world.json"  # present only in the synthetic world's directory
# The config entries that are paths, as dotted keys; config.json stores them portably (module docstring).
PATH_KEYS = ("data.world_dir", "data.tokenizer", "data.cache_dir", "init_from", "policy_from", "rm_from")


# ----------------------------------------------------------------------------------------------- data paths


def is_synthetic_world(data_dir: str | pathlib.Path) -> bool:
    """Whether ``data_dir`` is the synthetic world's (``world.json`` beside the jsonl files), which has a gold score."""
    return (pathlib.Path(data_dir) / WORLD_FILE).exists()


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """Where a stage's data lives (see the module docstring for the defaults)."""

    world: pathlib.Path  # the data directory (the synthetic world or your jsonl files)
    tokenizer: pathlib.Path
    cache: pathlib.Path  # TFDS cache

    @property
    def synthetic(self) -> bool:
        return is_synthetic_world(self.world)


def data_paths(data: Any, need_data: bool = True) -> DataPaths:
    """The ``DataPaths`` of a stage's ``data`` config section (``world_dir``, ``tokenizer``, ``cache_dir``).
    ``need_data=False`` (reading a finished stage) accepts a section without ``world_dir`` when it names the
    tokenizer, as an imported model's does."""
    if not data.get("world_dir") and (need_data or not data.get("tokenizer")):
        raise ValueError("config.data.world_dir is not set (scripts/make_synthetic_data.py writes a world)")
    world = pathlib.Path(data.get("world_dir") or "")
    tokenizer = pathlib.Path(data["tokenizer"]) if data.get("tokenizer") else world / TOKENIZER_FILE
    cache = pathlib.Path(data["cache_dir"]) if data.get("cache_dir") else world / TFDS_DIR
    return DataPaths(world, tokenizer, cache)


# ----------------------------------------------------------------------------------------------- reading a workdir


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The ``config.json`` a stage wrote into its workdir (an error naming the file if there is none), with
    its ``PATH_KEYS`` resolved to absolute paths from where the workdir is now."""
    workdir = pathlib.Path(workdir)
    path = workdir / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {workdir} a finished stage's workdir?")
    written = json.loads(path.read_text())
    return ml_collections.ConfigDict(resolve_paths(written, workdir))


def portable_paths(config: dict, workdir: str | pathlib.Path) -> dict:
    """``config`` (plain dicts) with each ``PATH_KEYS`` entry relative to ``workdir`` when it lies inside the
    workdir's parent (the job directory), else absolute, and ``written_in``: the workdir's absolute path."""
    workdir = pathlib.Path(workdir).absolute()
    out = json.loads(json.dumps(config))  # a deep copy
    for section, key in _path_entries(out):
        target = pathlib.Path(section[key]).absolute()
        inside_job = target == workdir.parent or workdir.parent in target.parents
        section[key] = os.path.relpath(target, workdir) if inside_job else str(target)
    out["written_in"] = str(workdir)
    return out


def resolve_paths(config: dict, workdir: str | pathlib.Path) -> dict:
    """The inverse of ``portable_paths``: each relative ``PATH_KEYS`` entry resolved against ``workdir`` as it
    is now; if nothing is there, against the workdir the config was written in (``written_in``), then (a
    workdir written before paths were portable) against the current directory. Absolute paths stay."""
    workdir = pathlib.Path(workdir).absolute()
    out = json.loads(json.dumps(config))
    origins = [workdir]
    if out.get("written_in"):
        origins.append(pathlib.Path(out["written_in"]))
    for section, key in _path_entries(out):
        value = pathlib.Path(section[key])
        if value.is_absolute():
            continue
        candidates = [os.path.normpath(origin / value) for origin in origins]
        if not out.get("written_in"):  # written before paths were portable: relative to where the job ran
            candidates.append(str(value.absolute()))
        section[key] = next((c for c in candidates if pathlib.Path(c).exists()), candidates[0])
    return out


def _path_entries(config: dict) -> list[tuple[dict, str]]:
    """``(section, key)`` of every non-empty ``PATH_KEYS`` entry of a plain-dict config."""
    entries = []
    for dotted in PATH_KEYS:
        *parents, key = dotted.split(".")
        section = config
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict) and isinstance(section.get(key), str) and section[key]:
            entries.append((section, key))
    return entries


def finished_summary(workdir: str | pathlib.Path) -> dict | None:
    """A stage's ``summary.json`` if it finished (status ``done``), else None: a finished stage is skipped."""
    path = pathlib.Path(workdir) / SUMMARY_FILE
    if path.exists():
        summary = json.loads(path.read_text())
        return summary if summary.get("status") == "done" else None
    return None


# ----------------------------------------------------------------------------------------------- opening and closing


@dataclasses.dataclass(frozen=True)
class Opened:
    """What every stage's ``train()`` starts from: its workdir, mesh, logical rules, data paths and tokenizer."""

    workdir: pathlib.Path
    mesh: jax.sharding.Mesh
    rules: sharding.Rules
    paths: DataPaths
    tokenizer: Tokenizer


def open_stage(
    config: Any, workdir: str | pathlib.Path, *, data: Any = None, written: dict | None = None, vocab_size: int = 0
) -> Opened:
    """The first section of a stage's ``train()``, inside ``with workdir_lock(workdir):``: create ``workdir``,
    write ``config.json`` (``written``, else ``config`` itself; process 0 only), build the mesh and rules of
    ``config``, and load the tokenizer of the ``data`` section (default ``config.data``). ``vocab_size`` > 0
    checks the tokenizer fits the model."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        plain = written if written is not None else json.loads(config.to_json_best_effort())
        write_config(workdir, plain)
    mesh, rules = sharding.make_mesh(config.mesh_shape), sharding.as_rules(config.rules)
    paths = data_paths(config.data if data is None else data)
    tokenizer = load_tokenizer(paths.tokenizer)
    if vocab_size and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={vocab_size}")
    return Opened(workdir, mesh, rules, paths, tokenizer)


def write_config(workdir: str | pathlib.Path, config: dict) -> None:
    """Write a stage's ``config.json`` (plain dicts) with its paths made portable (``portable_paths``)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    path.write_text(json.dumps(portable_paths(config, workdir), indent=1) + "\n")


def check_lengths(cfg: ModelConfig, model: str, lengths: dict[str, int]) -> None:
    """Refuse, before anything compiles, a sequence length a stage would feed a model beyond its positions
    (``model.max_len``: a learned position table's size, or the context a RoPE model was trained for).
    ``lengths`` maps the config keys (or sums of them) to their lengths; ``model`` names the model."""
    for key, length in lengths.items():
        if length > cfg.max_len:
            raise ValueError(
                f"{key}={length} exceeds the {model}'s {cfg.max_len} positions (model.max_len): a longer sequence "
                f"{'reads past its position table' if cfg.positions == 'learned' else 'runs past its context'}; "
                f"make {key} at most {cfg.max_len}"
            )


def report_padding(name: str, batches: Sequence[dict], max_len: int) -> int:
    """The longest real row of ``batches`` (each with a ``mask`` whose last axis is the sequence); prints a note
    when it is at most half of ``max_len``, since every row is padded to ``max_len`` and pays for it."""
    longest = max((int(np.asarray(b["mask"]).sum(axis=-1).max()) for b in batches), default=0)
    if longest and 2 * longest <= max_len and jax.process_index() == 0:
        print(
            f"[{name}] note: the longest validation sequence has {longest} tokens, and every row is padded to "
            f"config.data.max_len={max_len}; a lower max_len computes less",
            flush=True,
        )
    return longest


def close_stage(workdir: str | pathlib.Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The last section of a stage's ``train()``: write ``summary.json`` (process 0) and return the summary."""
    if jax.process_index() == 0:
        (pathlib.Path(workdir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------- a finished stage


@dataclasses.dataclass
class Stage:
    """A trained stage, ready to sample from."""

    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    params: Any
    tokenizer: Tokenizer
    mesh: jax.sharding.Mesh
    rules: sharding.Rules


def load_stage(workdir: str | pathlib.Path, best: bool = False, mesh_shape: Sequence[int] | None = None) -> Stage:
    """The model, params (latest checkpoint, or the best evaluation with ``best``) and tokenizer of a stage."""
    workdir = pathlib.Path(workdir)
    config = read_config(workdir)
    cfg = dataclasses.replace(ModelConfig.from_dict(config.model), dropout_rate=0.0)
    mesh = sharding.make_mesh(mesh_shape or config.mesh_shape)
    rules = sharding.as_rules(config.rules)
    model = Transformer(cfg)
    params = checkpoint.load_params(workdir, *sharding.model_shardings(model, mesh, rules), best=best)
    tokenizer = load_tokenizer(data_paths(config.data, need_data=False).tokenizer)
    return Stage(config, cfg, params, tokenizer, mesh, rules)


def sample_texts(
    stage: Stage,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    template: str | None = None,
    samples_per_prompt: int = 1,
) -> list[tuple[str, bool]]:
    """``(response text before EOS, whether it stopped)`` for each prompt, in order; with
    ``samples_per_prompt`` = K, K of them per prompt (prompt i's are items i·K .. i·K + K - 1), each prompt
    prefilled once for its K samples (``sampling.generate``).

    Prompts are batched ``batch_size`` at a time (the last batch padded with repeats, which are dropped),
    so every call of one size compiles once per prompt bucket.
    """
    tok = stage.tokenizer
    out: list[tuple[str, bool]] = []
    rng = jax.random.key(seed)
    with sharding.use(stage.mesh, stage.rules):
        for start, n, prompt, prompt_mask in prompt_batches(stage, prompts, batch_size, template):
            gen = sampling.generate(
                stage.params,
                stage.model_cfg,
                prompt,
                prompt_mask,
                jax.random.fold_in(rng, start),
                max_new_tokens=max_new_tokens,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                samples_per_prompt=samples_per_prompt,
            )
            gen_tokens = sharding.to_host(gen.tokens)
            out += [tok.decode_response(gen_tokens[i].tolist()) for i in range(n * samples_per_prompt)]
    return out


def prompt_batches(
    stage: Stage, prompts: Sequence[str], batch_size: int, template: str | None = None
) -> Iterator[tuple[int, int, jax.Array, jax.Array]]:
    """``(start, real rows, prompt [B,P], prompt_mask [B,P])`` global batches of the templated, left-padded
    prompts; B is ``batch_size`` rounded up to the batch shards, the last batch padded with repeats."""
    template = template or stage.config.data.get("prompt_template", "{prompt}")
    divisor = sharding.batch_divisor(stage.mesh, stage.rules)
    batch_size = divisor * -(-batch_size // divisor)
    for start in range(0, len(prompts), batch_size):
        ids = [stage.tokenizer.encode(template.format(prompt=p)) for p in prompts[start : start + batch_size]]
        n = len(ids)
        ids += [ids[-1]] * (batch_size - n)
        tokens, mask = sampling.pad_prompts(ids, stage.tokenizer.pad_id)
        yield (start, n, *sharding.put_global((tokens, mask), stage.mesh, stage.rules))

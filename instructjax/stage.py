"""The stage workdir contract: what a stage writes, where it finds its data, and how another stage reads it.

A stage workdir (``train_sft``, ``train_rm``, ``train_ppo``, or an imported Hugging Face model) holds:

- ``config.json``: the stage's whole config; its ``model`` and ``data`` sections are what ``load_stage`` needs
  to rebuild the model and find the tokenizer (a PPO workdir copies them from its policy's stage);
- ``checkpoints/<step>/`` and ``best/`` (``checkpoint.py``), ``metrics.jsonl`` and ``tb/`` (``metrics.py``);
- ``summary.json``: written at the end; ``status`` is ``done`` once the stage finished (the pipeline skips it).

A stage's data settings name a data directory (``data.world_dir``: the synthetic world or your jsonl files),
a tokenizer (``data.tokenizer``; default ``<world_dir>/tokenizer.json``) and a TFDS cache (``data.cache_dir``;
default ``<world_dir>/tfds``). The data is the synthetic world when ``world.json`` is beside it: only then is
there a gold score.

``open_stage`` and ``close_stage`` are the first and last section of every stage's ``train()``;
``load_stage`` and ``sample_texts`` are how evaluation, the scripts and later stages read a finished one.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections

from instructjax import checkpoint, sampling, sharding
from instructjax.model import ModelConfig, Transformer
from instructjax.tokenizer import Tokenizer, load_tokenizer

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
TOKENIZER_FILE = "tokenizer.json"  # the default tokenizer, inside the data directory
TFDS_DIR = "tfds"  # the default TFDS cache, inside the data directory
WORLD_FILE = "world.json"  # present only in the synthetic world's directory


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
    tokenizer = pathlib.Path(data.tokenizer) if data.get("tokenizer") else world / TOKENIZER_FILE
    cache = pathlib.Path(data.cache_dir) if data.get("cache_dir") else world / TFDS_DIR
    return DataPaths(world, tokenizer, cache)


# ----------------------------------------------------------------------------------------------- reading a workdir


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The ``config.json`` a stage wrote into its workdir (an error naming the file if there is none)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {workdir} a finished stage's workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


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
    """The first section of a stage's ``train()``: create ``workdir``, write ``config.json`` (``written``, else
    ``config`` itself; process 0 only), build the mesh and rules of ``config``, and load the tokenizer of the
    ``data`` section (default ``config.data``). ``vocab_size`` > 0 checks the tokenizer fits the model."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        text = json.dumps(written, indent=1) if written is not None else config.to_json_best_effort(indent=1)
        (workdir / CONFIG_FILE).write_text(text + "\n")
    mesh, rules = sharding.make_mesh(config.mesh_shape), sharding.as_rules(config.rules)
    paths = data_paths(config.data if data is None else data)
    tokenizer = load_tokenizer(paths.tokenizer)
    if vocab_size and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={vocab_size}")
    return Opened(workdir, mesh, rules, paths, tokenizer)


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
) -> list[tuple[str, bool]]:
    """``(response text before EOS, whether it stopped)`` for each prompt, in order.

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
            )
            gen_tokens = sharding.to_host(gen.tokens)
            out += [tok.decode_response(gen_tokens[i].tolist()) for i in range(n)]
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

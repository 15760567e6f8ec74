"""The main job: every stage in order on the synthetic world, then the evaluation and a report.

``run(config, workdir)`` (``configs/pipeline.py``): world -> base -> sft -> rm -> ppo_init -> ppo, ppo_ptx ->
evaluation. With ``config.ppo_from='sft'`` PPO starts from the SFT model and ``ppo_init`` is not trained (the
TL;DR recipe's setting, as in Huang et al. 2024); the default ``'ppo_init'`` is the paper's.

- ``base``: stage 0, the world's pretrained model.
- ``sft``: the paper's SFT from the base model; the RM starts from it.
- ``rm``: the reward model on the K-way comparisons, bias-normalised on the demonstrations.
- ``ppo_init``: PPO's starting point and KL reference (10% pretraining mixed in, App. C.3), from the base
  model; its checkpoint is selected by validation loss (``config.ppo_init.select_by``; ``'score'`` is the
  paper's selection by the mean RM score of greedy responses on validation prompts, §3.5).
- ``ppo`` and ``ppo_ptx``: stage 3 from ``ppo_init`` against the RM, without and with the pretraining term.

Each stage has its own sub-workdir; a finished stage (``summary.json`` with status ``done``) is
skipped, an interrupted one resumes from its checkpoint, so rerunning the command continues the job.
Outputs: ``results.json``, ``report.md``, ``training_curves.png`` and ``ppo_vs_kl.png`` in ``workdir``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from instructjax import evaluate, loop, metrics, reward, sharding, stage, train_ppo, train_rm, train_sft
from instructjax.data import world
from instructjax.model import ModelConfig
from instructjax.tokenizer import load_tokenizer

# (stage, the stage whose params it starts from); PPO starts from ppo_init and uses rm
STAGES = (
    ("base", None),
    ("sft", "base"),
    ("rm", "sft"),
    ("ppo_init", "base"),
    ("ppo", "ppo_init"),
    ("ppo_ptx", "ppo_init"),
)
POLICIES = ("base", "sft", "ppo_init", "ppo", "ppo_ptx")  # the models evaluated by sampling
# What config.data_dir must hold (formats in docs/data.md), under the synthetic world's file names.
DATA_FILES = (
    "pretrain_train",
    "pretrain_heldout",
    "demos_train",
    "demos_valid",
    "comparisons_train",
    "comparisons_valid",
    "prompts_train",
    "prompts_valid",
    "prompts_test",
)


def train_stages(
    config: Any, workdir: str | pathlib.Path, names: Sequence[str] | None = None
) -> tuple[pathlib.Path, dict[str, pathlib.Path], dict[str, float]]:
    """The world (or ``config.data_dir``), then the stages in ``names`` (default: all of ``STAGES``), each
    skipped when finished and resumed when interrupted. A stage's upstream must be among ``names`` or
    finished. Returns the world's directory, every stage's workdir and the seconds per stage run."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1) + "\n")
    names = [name for name, _ in STAGES] if names is None else list(names)
    unknown = sorted(set(names) - {name for name, _ in STAGES})
    if unknown:
        raise ValueError(f"unknown stages {unknown}: the pipeline's are {[name for name, _ in STAGES]}")
    seconds: dict[str, float] = {}
    job_start = time.perf_counter()
    steps = ["world", *(name for name, _ in STAGES), "evaluation"]  # numbered as in the whole job

    def announce(name: str, what: str) -> str:
        label = f"[{steps.index(name) + 1}/{len(steps)}] {name}"
        print(f"[pipeline] {label}: {what} (job time so far {_clock(time.perf_counter() - job_start)})", flush=True)
        return label

    # ------------------------------------------------------------------ data: the synthetic world, or yours
    start = time.perf_counter()
    if config.data_dir:
        world_dir = pathlib.Path(config.data_dir).absolute()
        missing = [f"{name}.jsonl" for name in DATA_FILES if not (world_dir / f"{name}.jsonl").exists()]
        if missing:
            raise FileNotFoundError(f"config.data_dir={world_dir} lacks {', '.join(missing)} (see configs/pipeline.py)")
        announce("world", f"your data in {world_dir}")
    else:
        world_dir = workdir / "world"
        if not stage.is_synthetic_world(world_dir):
            announce("world", f"writing {world_dir}")
            world.write_world(world_dir, seed=config.seed, sizes=world.WorldSizes(**config.world.to_dict()))
    seconds["world"] = time.perf_counter() - start
    stage_dirs = {name: workdir / name for name, _ in STAGES}
    base_model = None
    if config.base_from:  # e.g. a Hugging Face model imported with scripts/convert_hf.py
        stage_dirs["base"] = pathlib.Path(config.base_from).absolute()
        base_model = stage.read_config(stage_dirs["base"]).model
    ppo_from = config.get("ppo_from", "ppo_init")
    if ppo_from not in ("ppo_init", "sft"):
        raise ValueError(f"config.ppo_from={ppo_from!r}: 'ppo_init' (the paper) or 'sft'")
    tokenizer = config.tokenizer
    if not tokenizer and config.base_from and (stage_dirs["base"] / "tokenizer").is_dir():
        tokenizer = str(stage_dirs["base"] / "tokenizer")  # where convert_hf.py puts the model's tokenizer

    # ------------------------------------------------------------------ training stages
    for name, init_from in STAGES:
        if name not in names:
            continue
        stage_dir = stage_dirs[name]
        if name == "base" and config.base_from:
            announce(name, f"given: {stage_dir}")
            seconds[name] = 0.0
            continue
        if name == "ppo_init" and ppo_from == "sft":
            announce(name, "not trained: PPO starts from sft (config.ppo_from)")
            seconds[name] = 0.0
            continue
        if name in ("ppo", "ppo_ptx"):
            init_from = ppo_from
        summary = stage.finished_summary(stage_dir)
        if summary is not None:
            announce(name, f"finished earlier ({summary['wall_seconds']:.0f} s), skipped")
            seconds[name] = summary["wall_seconds"]
            continue
        stage_config = config[name].copy_and_resolve_references()
        if config.get("logging") is not None and config.logging.wandb:  # the job's tracking for every stage
            stage_config.logging = config.logging.copy_and_resolve_references()
        label = announce(name, f"training from {init_from or 'scratch'} -> {stage_dir}")
        with metrics.progress_label(label):  # the stage's own bar shows its progress and ETA
            if name in ("ppo", "ppo_ptx"):  # data, tokenizer, model, template: the policy's stage
                stage_config.policy_from, stage_config.rm_from = str(stage_dirs[init_from]), str(stage_dirs["rm"])
                summary = train_ppo.train(stage_config, stage_dir)
            else:
                stage_config.data.world_dir = str(world_dir)
                stage_config.data.tokenizer = tokenizer
                if config.data_dir:  # your data: the TFDS cache goes under the job, not into your data directory
                    stage_config.data.cache_dir = str(workdir / "tfds")
                stage_config.init_from = str(stage_dirs[init_from]) if init_from else ""
                if base_model is not None:  # the given base model's architecture; the stage's head, dropout
                    head, dropout_rate = stage_config.model.head, stage_config.model.dropout_rate
                    stage_config.model = base_model.copy_and_resolve_references()  # a copy: each stage sets its own
                    stage_config.model.head, stage_config.model.dropout_rate = head, dropout_rate
                if name == "rm":
                    summary = train_rm.train(stage_config, stage_dir)
                elif stage_config.select_by == "score":  # the paper's selection: mean RM score, valid prompts
                    score_fn = _rm_score_fn(config, stage_config, stage_dirs["rm"], world_dir)
                    summary = train_sft.train(stage_config, stage_dir, score_fn)
                else:
                    summary = train_sft.train(stage_config, stage_dir)
        seconds[name] = summary["wall_seconds"]
        if summary["status"] != "done":  # SIGTERM: the stage saved; later stages must not start from it
            announce(name, "stopped by SIGTERM after saving its checkpoint; rerun the same command to resume")
            raise loop.Preempted(f"{name} was preempted at step {summary['step']} of {summary['total_steps']}")
        announce(name, f"done in {_clock(seconds[name])}")

    return world_dir, stage_dirs, seconds


def run(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
    """The whole job: ``train_stages`` for every stage, then the evaluation, ``results.json`` and the report."""
    workdir = pathlib.Path(workdir)
    world_dir, stage_dirs, seconds = train_stages(config, workdir)
    ppo_from = config.get("ppo_from", "ppo_init")
    if ppo_from == "sft":  # no ppo_init stage: nothing to evaluate or plot for it
        stage_dirs = {name: path for name, path in stage_dirs.items() if name != "ppo_init"}
    has_gold = stage.is_synthetic_world(world_dir)  # the gold score is the synthetic world's; your data has none
    label = f"[pipeline] [{len(STAGES) + 2}/{len(STAGES) + 2}] evaluation"  # after the world and every stage
    n_models = sum(name in stage_dirs for name in POLICIES)
    print(f"{label}: {n_models} models on {config.eval.prompts} test prompts", flush=True)

    # ------------------------------------------------------------------ evaluation
    start = time.perf_counter()
    prompts = [json.loads(line)["prompt"] for line in (world_dir / "prompts_test.jsonl").read_text().splitlines()]
    prompts = prompts[: config.eval.prompts]
    models = evaluate.compare_models(
        {name: stage_dirs[name] for name in POLICIES if name in stage_dirs},
        baseline="sft",
        rm=reward.load_reward_model(stage_dirs["rm"]),
        prompts=prompts,
        pretrain_file=world_dir / "pretrain_heldout.jsonl",
        kl_prompts=config.eval.kl_prompts,
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size,
        gold=has_gold,
        best=[ppo_from],  # as PPO starts from it: the checkpoint its selection kept (train_ppo loads best)
        cache_dir=workdir / "tfds" if config.data_dir else None,
    )
    seconds["evaluation"] = time.perf_counter() - start
    rm_summary = json.loads((stage_dirs["rm"] / "summary.json").read_text())
    world_info = json.loads((world_dir / "world.json").read_text()) if has_gold else {}
    results = {
        "models": {name: {k: v for k, v in r.items() if k != "samples"} for name, r in models.items()},
        "rm": {
            "val_accuracy": rm_summary["best_eval"]["val_accuracy"],
            "gold_accuracy": rm_summary["best_eval"].get("val_gold_accuracy"),
            "val_loss": rm_summary["best_eval"]["val_loss"],
            "labeler_agreement": world_info.get("labeler_agreement_comparisons_valid"),
            "bias": rm_summary["bias"],
        },
        "seconds": seconds,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot_curves(workdir, stage_dirs)
    _report(workdir, results, models, config.eval.samples_in_report)
    print(f"{label}: done in {_clock(seconds['evaluation'])}; report: {workdir / 'report.md'}", flush=True)
    return results


def _cell(row: dict, key: str, spec: str) -> str:
    value = row.get(key)
    return "–" if value is None else format(value, spec)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _rm_score_fn(config: Any, stage_config: Any, rm_dir: pathlib.Path, world_dir: pathlib.Path):
    """The SFT selection hook: mean normalised RM score of greedy responses on validation prompts."""
    rm = reward.load_reward_model(rm_dir)
    cfg = dataclasses.replace(ModelConfig.from_dict(stage_config.model), dropout_rate=0.0)
    mesh, rules = sharding.make_mesh(stage_config.mesh_shape), sharding.as_rules(stage_config.rules)
    tokenizer = load_tokenizer(stage.data_paths(stage_config.data).tokenizer)
    policy = stage.Stage(stage_config, cfg, None, tokenizer, mesh, rules)
    lines = (world_dir / "prompts_valid.jsonl").read_text().splitlines()[: config.eval.select_prompts]
    prompts = [json.loads(line)["prompt"] for line in lines]
    return reward.policy_score_fn(rm, policy, prompts, config.eval.max_new_tokens, config.eval.batch_size)


def _legend_or_note(ax) -> None:
    """A legend, or a note on a panel with no curves (a stage imported rather than trained has no metrics)."""
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no metrics recorded", ha="center", va="center", transform=ax.transAxes)


def _plot_curves(workdir: pathlib.Path, stage_dirs: dict[str, pathlib.Path]) -> None:
    """``training_curves.png``: loss per supervised stage, scores per PPO iteration; ``ppo_vs_kl.png``: the
    RM and gold score of PPO's rollouts against their KL to the reference (cf. Gao et al.)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stage_dirs)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2))
    for ax, name in zip(axes, names, strict=True):
        rows = metrics.read_metrics(stage_dirs[name])
        if name in ("ppo", "ppo_ptx"):
            for key, label in (("rm_score", "RM score (rollouts)"), ("gold_score", "gold score (rollouts)")):
                points = [(r["step"], r[key]) for r in rows if key in r]
                if points:
                    ax.plot(*zip(*points, strict=True), lw=1, label=label)
            for key, label in (("val_rm_score", "RM score (valid, greedy)"), ("val_gold_score", "gold (valid)")):
                points = [(r["step"], r[key]) for r in rows if key in r]
                if points:
                    ax.plot(*zip(*points, strict=True), "o-", ms=3, label=label)
            ax.set_xlabel("iteration")
            ax.set_ylabel("score")
            ax.set_title(name)
            _legend_or_note(ax)
            continue
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "tokens_per_s" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label="train", lw=1)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="validation", ms=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("ranking loss (nats/prompt)" if name == "rm" else "loss (nats/token)")
        _legend_or_note(ax)
    fig.tight_layout()
    fig.savefig(workdir / "training_curves.png", dpi=110)
    plt.close(fig)

    ppo_runs = [n for n in names if n in ("ppo", "ppo_ptx")]
    if not ppo_runs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for name in ppo_runs:
        rows = [r for r in metrics.read_metrics(stage_dirs[name]) if "rm_score" in r]
        kl = np.asarray([r["kl"] for r in rows])
        for ax, key in zip(axes, ("rm_score", "gold_score"), strict=True):
            if rows and key in rows[0]:
                ax.plot(_smooth(kl), _smooth(np.asarray([r[key] for r in rows])), label=name, lw=1.2)
    for ax, label in zip(axes, ("RM score", "gold score"), strict=True):
        ax.set_xlabel("KL to the reference (nats per response)")
        ax.set_ylabel(f"{label} of rollouts")
        if ax.get_legend_handles_labels()[0]:  # data without a gold score leaves the gold panel empty
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(workdir / "ppo_vs_kl.png", dpi=110)
    plt.close(fig)


def _smooth(x: np.ndarray, window: int = 10) -> np.ndarray:
    if len(x) < window:
        return x
    return np.convolve(x, np.ones(window) / window, mode="valid")


def results_table(results: dict) -> list[str]:
    """The models table of ``results.json`` (``run``'s return) as Markdown lines: what the report opens with and
    what ``scripts/pipeline.py`` prints at the end."""
    lines = [
        "| model | gold score | win vs SFT (gold) | win vs SFT (RM) | RM score | KL to SFT | stops (EOS) "
        "| response words | held-out pretraining NLL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        cells = [
            _cell(r, "gold_score", ".3f"),
            _cell(r, "gold_win_rate_vs_sft", ".1%"),
            _cell(r, "rm_win_rate_vs_sft", ".1%"),
            _cell(r, "rm_score", ".2f"),
            _cell(r, "kl_to_sft", ".2f") + ("" if r.get("kl_to_sft_se") is None else f" ± {r['kl_to_sft_se']:.2f}"),
            _cell(r, "stop_rate", ".1%"),
            _cell(r, "response_words", ".1f"),
            _cell(r, "pretrain_nll", ".3f"),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _report(workdir: pathlib.Path, results: dict, models: dict, n_samples: int) -> None:
    lines = ["# instructjax pipeline report", "", f"Devices: {results['devices']}.", ""]
    lines += results_table(results)
    lines += [
        "",
        "Gold score: `instructjax/data/world_tasks.py` (1 = correct answer and a clean stop; – = data without one).",
        "RM score: the reward model's",
        "score minus its bias (demonstrations average 0). Greedy decoding on the test prompts; win rates",
        "compare each prompt's response with the SFT model's (ties count half). KL to SFT: nats per response,",
        "on the model's own samples at temperature 1 (one sample per prompt), ± its standard error.",
        "",
    ]
    rm = results["rm"]
    lines += ["## Reward model (validation comparisons)", "", "| metric | value |", "|---|---|"]
    lines += [
        f"| pairwise accuracy vs the labelers | {_cell(rm, 'val_accuracy', '.1%')} |",
        f"| a second labeler's agreement with the labelers | {_cell(rm, 'labeler_agreement', '.1%')} |",
        f"| pairwise accuracy vs the gold score | {_cell(rm, 'gold_accuracy', '.1%')} |",
        f"| log loss (per prompt) | {_cell(rm, 'val_loss', '.3f')} |",
        f"| bias (mean raw reward of the demonstrations) | {_cell(rm, 'bias', '.3f')} |",
        "",
    ]
    lines += ["## Time (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["seconds"].items()]
    lines += ["", "## Training curves", "", "![training curves](training_curves.png)", ""]
    if (workdir / "ppo_vs_kl.png").exists():
        lines += ["## PPO: scores against KL", "", "![scores against KL](ppo_vs_kl.png)", ""]
    lines += ["## Samples", ""]
    names = list(models)
    lines += ["| prompt | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i in range(min(n_samples, len(models[names[0]]["samples"]))):
        cells = []
        for name in names:
            s = models[name]["samples"][i]
            score = f"{s['gold']:.2f}" if "gold" in s else f"RM {s['rm']:.2f}"
            cells.append(f"{s['response'] or '(empty)'}{'' if s['stopped'] else ' …'} ({score})")
        lines.append(f"| `{models[names[0]]['samples'][i]['prompt']}` | " + " | ".join(cells) + " |")
    (workdir / "report.md").write_text("\n".join(lines) + "\n")

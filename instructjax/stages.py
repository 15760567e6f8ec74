"""The main job: every stage in order on the synthetic world, then the evaluation and a report.

``run(config, workdir)`` (``configs/pipeline.py``): world -> base -> sft -> rm -> ppo_init -> evaluation.

- ``base``: stage 0, the world's pretrained model.
- ``sft``: the paper's SFT from the base model; the RM starts from it.
- ``rm``: the reward model on the K-way comparisons, bias-normalised on the demonstrations.
- ``ppo_init``: PPO's starting point (10% pretraining mixed in, App. C.3), from the base model, its
  checkpoint selected by the mean RM score of its greedy responses on validation prompts (§3.5).

Each stage has its own sub-workdir; a finished stage (``summary.json`` with status ``done``) is
skipped, an interrupted one resumes from its checkpoint, so rerunning the command continues the job.
Outputs: ``results.json``, ``report.md`` and ``training_curves.png`` in ``workdir``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np

from instructjax import evaluate, metrics, reward, sharding, train_ppo, train_rm, train_sft
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


def _finished(stage_dir: pathlib.Path) -> dict | None:
    path = stage_dir / "summary.json"
    if path.exists():
        summary = json.loads(path.read_text())
        return summary if summary.get("status") == "done" else None
    return None


def run(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1) + "\n")
    seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ the synthetic world
    world_dir = workdir / "world"
    start = time.perf_counter()
    if not (world_dir / "world.json").exists():
        print(f"[pipeline] world -> {world_dir}")
        world.write_world(world_dir, seed=config.seed, sizes=world.WorldSizes(**config.world.to_dict()))
    seconds["world"] = time.perf_counter() - start

    # ------------------------------------------------------------------ training stages
    for name, init_from in STAGES:
        stage_dir = workdir / name
        summary = _finished(stage_dir)
        if summary is None:
            stage = config[name].copy_and_resolve_references()
            print(f"[pipeline] {name} -> {stage_dir}")
            if name in ("ppo", "ppo_ptx"):  # the world, tokenizer and template come from the policy's stage
                stage.policy_from, stage.rm_from = str(workdir / init_from), str(workdir / "rm")
                summary = train_ppo.train(stage, stage_dir)
                seconds[name] = summary["wall_seconds"]
                continue
            stage.data.world_dir = str(world_dir)
            stage.init_from = str(workdir / init_from) if init_from else ""
            if name == "rm":
                summary = train_rm.train(stage, stage_dir)
            elif stage.select_by == "score":  # the paper's SFT selection: mean RM score on validation prompts
                summary = train_sft.train(stage, stage_dir, _rm_score_fn(config, stage, workdir / "rm", world_dir))
            else:
                summary = train_sft.train(stage, stage_dir)
        else:
            print(f"[pipeline] {name}: finished earlier, skipped")
        seconds[name] = summary["wall_seconds"]

    # ------------------------------------------------------------------ evaluation
    start = time.perf_counter()
    prompts = [json.loads(line)["prompt"] for line in (world_dir / "prompts_test.jsonl").read_text().splitlines()]
    prompts = prompts[: config.eval.prompts]
    models = evaluate.compare_models(
        {name: workdir / name for name in POLICIES},
        baseline="sft",
        rm=reward.load_reward_model(workdir / "rm"),
        prompts=prompts,
        pretrain_file=world_dir / "pretrain_heldout.jsonl",
        kl_prompts=config.eval.kl_prompts,
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size,
    )
    seconds["evaluation"] = time.perf_counter() - start
    rm_summary = json.loads((workdir / "rm" / "summary.json").read_text())
    world_info = json.loads((world_dir / "world.json").read_text())
    results = {
        "models": {name: {k: v for k, v in r.items() if k != "samples"} for name, r in models.items()},
        "rm": {
            "val_accuracy": rm_summary["best_eval"]["val_accuracy"],
            "gold_accuracy": rm_summary["best_eval"]["val_gold_accuracy"],
            "val_loss": rm_summary["best_eval"]["val_loss"],
            "labeler_agreement": world_info.get("labeler_agreement_comparisons_valid"),
            "bias": rm_summary["bias"],
        },
        "seconds": seconds,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot_curves(workdir, [name for name, _ in STAGES])
    _report(workdir, results, models, config.eval.samples_in_report)
    return results


def _rm_score_fn(config: Any, stage_config: Any, rm_dir: pathlib.Path, world_dir: pathlib.Path):
    """The SFT selection hook: mean normalised RM score of greedy responses on validation prompts."""
    rm = reward.load_reward_model(rm_dir)
    cfg = dataclasses.replace(ModelConfig.from_dict(stage_config.model), dropout_rate=0.0)
    mesh, rules = sharding.make_mesh(stage_config.mesh_shape), sharding.as_rules(stage_config.rules)
    policy = evaluate.Stage(stage_config, cfg, None, load_tokenizer(world_dir / "tokenizer.json"), mesh, rules)
    lines = (world_dir / "prompts_valid.jsonl").read_text().splitlines()[: config.eval.select_prompts]
    prompts = [json.loads(line)["prompt"] for line in lines]
    return reward.policy_score_fn(rm, policy, prompts, config.eval.max_new_tokens, config.eval.batch_size)


def _plot_curves(workdir: pathlib.Path, names: list[str]) -> None:
    """``training_curves.png``: loss per supervised stage, scores per PPO iteration; ``ppo_vs_kl.png``: the
    RM and gold score of PPO's rollouts against their KL to the reference (cf. Gao et al.)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2))
    for ax, name in zip(axes, names, strict=True):
        rows = metrics.read_metrics(workdir / name)
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
            ax.legend(fontsize=7)
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
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(workdir / "training_curves.png", dpi=110)
    plt.close(fig)

    ppo_runs = [n for n in names if n in ("ppo", "ppo_ptx")]
    if not ppo_runs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for name in ppo_runs:
        rows = [r for r in metrics.read_metrics(workdir / name) if "rm_score" in r]
        kl = np.asarray([r["kl"] for r in rows])
        for ax, key in zip(axes, ("rm_score", "gold_score"), strict=True):
            if rows and key in rows[0]:
                ax.plot(_smooth(kl), _smooth(np.asarray([r[key] for r in rows])), label=name, lw=1.2)
    for ax, label in zip(axes, ("RM score", "gold score"), strict=True):
        ax.set_xlabel("KL to the reference (nats per response)")
        ax.set_ylabel(f"{label} of rollouts")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(workdir / "ppo_vs_kl.png", dpi=110)
    plt.close(fig)


def _smooth(x: np.ndarray, window: int = 10) -> np.ndarray:
    if len(x) < window:
        return x
    return np.convolve(x, np.ones(window) / window, mode="valid")


def _report(workdir: pathlib.Path, results: dict, models: dict, n_samples: int) -> None:
    lines = ["# instructjax pipeline report", "", f"Devices: {results['devices']}.", ""]
    lines += [
        "| model | gold score | win vs SFT (gold) | win vs SFT (RM) | RM score | KL to SFT | stops (EOS) "
        "| response words | held-out pretraining NLL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        lines.append(
            f"| {name} | {r['gold_score']:.3f} | {r['gold_win_rate_vs_sft']:.1%} | {r['rm_win_rate_vs_sft']:.1%} | "
            f"{r['rm_score']:.2f} | {r['kl_to_sft']:.2f} | {r['stop_rate']:.1%} | {r['response_words']:.1f} | "
            f"{r['pretrain_nll']:.3f} |"
        )
    lines += [
        "",
        "Gold score: `instructjax/data/world.py` (1 = correct answer and a clean stop). RM score: the reward model's",
        "score minus its bias (demonstrations average 0). Greedy decoding on the test prompts; win rates",
        "compare each prompt's response with the SFT model's (ties count half). KL to SFT: nats per response,",
        "on the model's own samples at temperature 1.",
        "",
    ]
    rm = results["rm"]
    lines += ["## Reward model (validation comparisons)", "", "| metric | value |", "|---|---|"]
    lines += [
        f"| pairwise accuracy vs the labelers | {rm['val_accuracy']:.1%} |",
        f"| a second labeler's agreement with the labelers | {rm['labeler_agreement']:.1%} |",
        f"| pairwise accuracy vs the gold score | {rm['gold_accuracy']:.1%} |",
        f"| log loss (per prompt) | {rm['val_loss']:.3f} |",
        f"| bias (mean raw reward of the demonstrations) | {rm['bias']:.3f} |",
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
            cells.append(f"{s['response'] or '(empty)'}{'' if s['stopped'] else ' …'} ({s['gold']:.2f})")
        lines.append(f"| `{models[names[0]]['samples'][i]['prompt']}` | " + " | ".join(cells) + " |")
    (workdir / "report.md").write_text("\n".join(lines) + "\n")

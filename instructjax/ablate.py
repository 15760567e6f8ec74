"""The paper's ablations on the synthetic world (paper_spec §5-6): ``run(config, workdir)``.

A sweep (``configs/ablations/NAME.py``) is a list of **points**, each a few dotted-key overrides of the
stages a point trains (``rm.data.pairs_as_examples=True``, ``ppo.kl.init_coef=0.1``), each run for
``seeds`` seeds (the seed of the point's own stages: ``rm.seed`` and ``ppo.seed`` + k).

- **Upstream, shared.** The pipeline's ``base``, ``sft``, ``rm`` and ``ppo_init`` are trained once, in
  ``upstream_dir`` (``stages.train_stages``), and every point starts from them: PPO from ``ppo_init``
  against the upstream RM, an RM point from the upstream SFT model. The seeds vary the point's own stages
  only, not upstream (as the paper's PPO seeds share one SFT and one RM).
- **A point** runs its ``steps``, in order, in ``upstream_dir/points/<steps>/<overrides>/seed<k>``:
  ``rm`` (its own RM from the SFT model), ``best_of_n`` (of ``ppo_init``'s samples under the point's RM)
  and ``ppo`` (from ``ppo_init`` against the point's RM, then evaluated on the test prompts). A point's
  directory is named by the overrides that differ from the pipeline's configs, so sweeps that share an
  upstream share their identical points: the default PPO run is a point of the β, γ, LR and episode sweeps.
- **Resumable.** A point writes ``result.json`` when done and is skipped on a rerun; an interrupted point's
  stages resume from their checkpoints. Points run in ``workers`` processes; a failed point does not stop
  the others, and the sweep then fails naming it and its log.
- **Outputs** in ``workdir``: ``ablation.json`` (every point's metrics per seed, mean and standard
  deviation), ``table.md`` and ``figure.png`` (error bars: ± one standard deviation over the seeds).

Three kinds of figure (``config.figure``): ``sweep`` (metrics against ``config.x``, a line per value of
``config.series``), ``curves`` (RM validation metrics over training) and ``overoptimization`` (Gao et al.:
gold and proxy score against d = sqrt(KL) for best-of-n and PPO, with the fits of ``fit_bon``/``fit_rl``).
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import pathlib
import time
import traceback
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from instructjax import evaluate, metrics, reward, stages, train_ppo, train_rm
from instructjax.data import world

UPSTREAM = ("base", "sft", "rm", "ppo_init")
STEPS = ("rm", "best_of_n", "ppo")  # what a point can train or measure, in this order
PPO_METRICS = ("gold_score", "rm_score", "kl_to_init", "pretrain_nll", "stop_rate", "response_words")


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity
class Point:
    """One sweep point at one seed: its stages' configs (overrides applied) and where it runs."""

    label: str  # the overrides that differ from the pipeline's configs, "default" when none
    values: dict[str, Any]  # every override of the point, parsed (the sweep's x and series come from here)
    seed: int
    steps: tuple[str, ...]
    workdir: pathlib.Path
    upstream: pathlib.Path
    rm: ml_collections.ConfigDict  # the point's RM config (used when "rm" in steps)
    ppo: ml_collections.ConfigDict  # the point's PPO config (used when "ppo" in steps)
    eval: ml_collections.ConfigDict


# ---------------------------------------------------------------------------------------------- the points
def parse_overrides(spec: str) -> dict[str, Any]:
    """``"ppo.kl.init_coef=0.1,ppo.ptx_coef=1"`` -> ``{"ppo.kl.init_coef": 0.1, "ppo.ptx_coef": 1}``; values
    are Python literals, or strings when they do not parse as one. ``""`` is the pipeline's own configs."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"sweep point {spec!r}: {item!r} is not key=value")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        out[key.strip()] = value
    return out


def _stage_field(configs: dict[str, Any], key: str, spec: str) -> tuple[str, str, Any]:
    stage, _, field = key.partition(".")
    if stage not in configs:
        raise ValueError(f"sweep point {spec!r}: {key!r} must start with one of {sorted(configs)} (the stage it sets)")
    node = configs[stage]
    for part in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(f"sweep point {spec!r}: the {stage} config has no field {field!r}")
        node = node[part]
    return stage, field, node


def _coerce(value: Any, like: Any, spec: str, key: str) -> Any:
    """The override as the type of the config's field (``1`` for a float field is ``1.0``)."""
    if isinstance(like, bool) or like is None:
        if like is not None and not isinstance(value, bool):
            raise ValueError(f"sweep point {spec!r}: {key} must be True or False, not {value!r}")
        return value
    if isinstance(like, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return type(like)(value)
    if type(value) is not type(like):
        raise ValueError(f"sweep point {spec!r}: {key} must be a {type(like).__name__}, not {value!r}")
    return value


def make_points(config: Any, upstream: pathlib.Path) -> list[Point]:
    """Every (point, seed) of the sweep, its stage configs built from the pipeline's ``rm`` and ``ppo``."""
    base = {"rm": config.pipeline.rm, "ppo": config.pipeline.ppo}
    steps = tuple(config.steps)
    if not steps or any(s not in STEPS for s in steps):
        raise ValueError(f"config.steps={steps!r}: a non-empty subset of {STEPS}")
    steps = tuple(s for s in STEPS if s in steps)
    points = []
    for spec in config.points:
        values = {**parse_overrides(config.common), **parse_overrides(spec)}
        changed: dict[str, Any] = {}
        for key, value in values.items():
            _, _, like = _stage_field(base, key, spec)
            values[key] = _coerce(value, like, spec, key)
            if values[key] != like:
                changed[key] = values[key]
        label = ",".join(f"{k}={v!r}" for k, v in sorted(changed.items())) or "default"
        for k in range(config.seeds):
            stage_configs = {name: c.copy_and_resolve_references() for name, c in base.items()}
            for key, value in values.items():
                stage, field, _ = _stage_field(stage_configs, key, spec)
                stage_configs[stage].update_from_flattened_dict({field: value})
            for c in stage_configs.values():
                c.seed = c.seed + k
            rm, ppo = stage_configs["rm"], stage_configs["ppo"]
            rm.data.world_dir, rm.init_from = str(upstream / "world"), str(upstream / "sft")
            workdir = upstream / "points" / "+".join(steps) / label / f"seed{k}"
            ppo.policy_from = str(upstream / "ppo_init")
            ppo.rm_from = str(workdir / "rm") if "rm" in steps else str(upstream / "rm")
            points.append(Point(label, values, k, steps, workdir, upstream, rm, ppo, config.eval))
    labels = [p.label for p in points]
    if len(set(labels)) * config.seeds != len(labels):
        raise ValueError(f"config.points has two points with the same settings: {sorted(labels)}")
    return points


# ---------------------------------------------------------------------------------------------- one point
def run_point(point: Point) -> dict[str, Any]:
    """Train and measure one point (its output in ``point.workdir/log.txt``); ``result.json`` when done."""
    done = point.workdir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    point.workdir.mkdir(parents=True, exist_ok=True)
    with open(point.workdir / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        from absl import logging

        logging.set_verbosity(logging.WARNING)
        start = time.perf_counter()
        result = {"label": point.label, "values": point.values, "seed": point.seed}
        if "rm" in point.steps:
            result["rm"] = _train_rm(point)
        if "best_of_n" in point.steps:
            result["best_of_n"] = _best_of_n(point)
        if "ppo" in point.steps:
            result["ppo"] = _train_ppo(point)
        # the run's cost: this call's time plus that of stages an earlier, interrupted call finished
        result["seconds"] = time.perf_counter() - start + sum(r.pop("reused_seconds", 0.0) for r in _parts(result))
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.rename(done)  # atomic: a killed point never leaves a half-written result
    return result


def _parts(result: dict) -> list[dict]:
    return [result[k] for k in ("rm", "ppo") if k in result]


def _train_rm(point: Point) -> dict[str, Any]:
    rm_dir = point.workdir / "rm"
    finished = stages.finished_summary(rm_dir)
    summary = finished or train_rm.train(point.rm, rm_dir)
    rows = [r for r in metrics.read_metrics(rm_dir) if "val_loss" in r]
    keys = ("val_accuracy", "val_loss", "val_gold_accuracy")
    return {
        **{k: summary["best_eval"].get(k) for k in keys},
        "total_steps": summary["total_steps"],
        "epochs": point.rm.num_epochs if not point.rm.num_steps else None,  # None: a step count was set
        "reused_seconds": finished["wall_seconds"] if finished else 0.0,
        "curve": [{"step": r["step"], **{k: r.get(k) for k in keys}} for r in rows],
    }


def _best_of_n(point: Point) -> list[dict[str, float]]:
    policy = evaluate.load_stage(point.upstream / "ppo_init", best=True)
    rm = reward.load_reward_model(point.ppo.rm_from)
    prompts = _prompts(point.upstream, point.eval.bon_prompts)
    ns = [int(n) for n in point.eval.bon_ns]
    # best_of_n draws sample s with seed + s: seeds 1,000 apart give each point's seeds disjoint samples
    return reward.best_of_n(rm, policy, prompts, world.gold_score, ns, seed=1000 * point.seed)


def _train_ppo(point: Point) -> dict[str, Any]:
    ppo_dir = point.workdir / "ppo"
    finished = stages.finished_summary(ppo_dir)
    if finished is None:
        train_ppo.train(point.ppo, ppo_dir)
    out = evaluate_policy(ppo_dir, point.upstream, reward.load_reward_model(point.ppo.rm_from), point.eval)
    out["reused_seconds"] = finished["wall_seconds"] if finished else 0.0
    keys = ("kl", "gold_score", "rm_score")  # the rollouts': KL to ppo_init, gold and proxy score (temperature 1)
    out["curve"] = [{"step": r["step"], **{k: r[k] for k in keys}} for r in metrics.read_metrics(ppo_dir) if "kl" in r]
    return out


def evaluate_policy(policy_dir: pathlib.Path, upstream: pathlib.Path, rm: Any, eval_config: Any) -> dict[str, Any]:
    """A policy on the first ``eval_config.prompts`` test prompts, greedy: gold and RM score (``rm``: the
    point's RM), stop rate, response words, per-prompt gold (for win rates), KL to ``ppo_init`` on its own
    samples (the first ``kl_prompts``) and the held-out pretraining NLL (the alignment tax's measure)."""
    init_dir = upstream / "ppo_init"
    is_init = pathlib.Path(policy_dir) == init_dir
    stage = evaluate.load_stage(policy_dir, best=is_init)
    reference = stage if is_init else evaluate.load_stage(init_dir, best=True)
    prompts, heldout = _prompts(upstream, eval_config.prompts), upstream / "world" / "pretrain_heldout.jsonl"
    sizes = (eval_config.kl_prompts, eval_config.max_new_tokens, eval_config.batch_size)
    result = evaluate.measure_policy(stage, reference, rm, prompts, heldout, *sizes)
    result["kl_to_init"] = result.pop("kl_to_reference")
    result["gold_per_prompt"] = [r["gold"] for r in result.pop("samples")]
    return result


def _prompts(upstream: pathlib.Path, n: int) -> list[str]:
    lines = (upstream / "world" / "prompts_test.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:n]]


# ---------------------------------------------------------------------------------------------- the sweep
def run(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Upstream, every point (skipping finished ones), then ``ablation.json``, ``table.md``, ``figure.png``."""
    from tqdm.auto import tqdm

    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1) + "\n")
    upstream = pathlib.Path(config.upstream_dir or workdir / "upstream").absolute()
    points = make_points(config, upstream)  # bad points fail here, before any training

    # ------------------------------------------------------------------ upstream: trained once, shared
    start = time.perf_counter()
    if config.pipeline.data_dir:
        raise ValueError("ablations need the synthetic world's gold score: config.pipeline.data_dir must be empty")
    stages.train_stages(config.pipeline, upstream, UPSTREAM)
    init_file = upstream / "points" / "init" / "result.json"  # ppo_init itself: the reference of every PPO point
    if not init_file.exists() and "ppo" in config.steps:
        init = evaluate_policy(upstream / "ppo_init", upstream, reward.load_reward_model(upstream / "rm"), config.eval)
        init_file.parent.mkdir(parents=True, exist_ok=True)
        init_file.write_text(json.dumps(init) + "\n")

    # ------------------------------------------------------------------ points: in parallel, resumable
    todo = [p for p in points if not (p.workdir / "result.json").exists()]
    print(f"[ablate] {config.name}: {len(points)} runs ({len(points) - len(todo)} done earlier) in {upstream}")
    results, failed = {}, []
    for p in points:
        if p not in todo:
            results[p.workdir] = run_point(p)
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc=f"ablation {config.name}", unit="run")
    for p, outcome in _finished_runs(todo, config.workers):
        bar.set_postfix_str(f"{p.label} seed {p.seed}")
        if isinstance(outcome, Exception):
            failed.append(f"{p.label} seed {p.seed}: see {p.workdir / 'log.txt'}")
            with open(p.workdir / "log.txt", "a") as log:
                log.write("".join(traceback.format_exception(outcome)))
        else:
            results[p.workdir] = outcome
        bar.update()
    bar.close()
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(points)} runs failed (the others are kept):\n" + "\n".join(failed))

    # ------------------------------------------------------------------ summary, table, figure
    init = json.loads(init_file.read_text()) if "ppo" in config.steps else None
    # A shared point's result.json may come from another sweep: its values are this sweep's point's.
    summary = summarize(config, [{**results[p.workdir], "values": p.values} for p in points], init)
    summary["call_seconds"] = time.perf_counter() - start  # this call's (finished points are not rerun)
    summary["run_seconds"] = sum(r["seconds"] for r in results.values())  # every run's own time, added up
    (workdir / "ablation.json").write_text(json.dumps(summary, indent=1) + "\n")
    (workdir / "table.md").write_text(table(config, summary) + "\n")
    plot(config, summary, workdir / "figure.png")
    print(f"[ablate] {config.name}: {workdir / 'table.md'}, {workdir / 'figure.png'}")
    return summary


def _finished_runs(todo: list[Point], workers: int):
    """(point, its result or the exception it raised) as each run finishes: in ``workers`` spawned processes
    (a fresh interpreter each: jax does not survive fork), or one by one in this process."""
    if workers <= 1 or len(todo) <= 1:
        for point in todo:
            try:
                yield point, run_point(point)
            except Exception as error:  # noqa: BLE001 - reported with the point's log, the others go on
                yield point, error
        return
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_point, point): point for point in todo}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.exception() or future.result()


# ---------------------------------------------------------------------------------------------- fits
def fit_bon(d: Sequence[float], r: Sequence[float]) -> dict[str, float]:
    """Least squares of Gao et al.'s best-of-n form R(d) = d·(α - β·d), d = sqrt(KL), R = gold - gold(init);
    returns α, β, R² (of the fit, against the mean of r), the peak d* = α/(2β) and R* = α²/(4β)."""
    d, r = np.asarray(d, float), np.asarray(r, float)
    (alpha, beta), r2 = _lstsq(np.stack([d, -d * d], axis=1), r)
    peak_d = alpha / (2 * beta) if beta > 0 else math.inf
    return {"alpha": alpha, "beta": beta, "r2": r2, "peak_d": peak_d, "peak_r": alpha * peak_d - beta * peak_d**2}


def fit_rl(d: Sequence[float], r: Sequence[float]) -> dict[str, float]:
    """Least squares of Gao et al.'s RL form R(d) = d·(α - β·log d) (d > 0 only); α, β, R², and the peak
    d* = exp(α/β - 1), R* = β·d*."""
    d, r = np.asarray(d, float), np.asarray(r, float)
    keep = d > 0
    d, r = d[keep], r[keep]
    (alpha, beta), r2 = _lstsq(np.stack([d, -d * np.log(d)], axis=1), r)
    peak_d = math.exp(alpha / beta - 1) if beta > 0 and alpha / beta < 50 else math.inf
    return {"alpha": alpha, "beta": beta, "r2": r2, "peak_d": peak_d, "peak_r": beta * peak_d}


def _lstsq(design: np.ndarray, r: np.ndarray) -> tuple[tuple[float, float], float]:
    if len(r) < 3:
        raise ValueError(f"a fit of two parameters needs at least 3 points, got {len(r)}")
    coef, *_ = np.linalg.lstsq(design, r, rcond=None)
    residual = r - design @ coef
    total = ((r - r.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / total if total > 0 else float("nan")
    return (float(coef[0]), float(coef[1])), float(r2)


def rl_points(curve: list[dict], gold0: float, proxy0: float, window: int) -> dict[str, list[float]]:
    """A PPO run's rollout curve binned over ``window`` iterations: d = sqrt(mean KL), gold and proxy score
    relative to the initial policy's (``gold0``, ``proxy0``: its temperature-1 samples, best-of-1)."""
    out = {"d": [], "gold": [], "proxy": []}
    for i in range(0, len(curve) - window + 1, window):
        rows = curve[i : i + window]
        out["d"].append(math.sqrt(max(np.mean([r["kl"] for r in rows]), 0.0)))
        out["gold"].append(float(np.mean([r["gold_score"] for r in rows])) - gold0)
        out["proxy"].append(float(np.mean([r["rm_score"] for r in rows])) - proxy0)
    return out


# ---------------------------------------------------------------------------------------------- summary
def _stats(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


def summarize(config: Any, results: list[dict], init: dict | None) -> dict[str, Any]:
    """Per point (in the sweep's order), each metric over the seeds; for ``overoptimization``, the fits."""
    by_label: dict[str, list[dict]] = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    points = []
    for label, runs in by_label.items():
        row: dict[str, Any] = {"label": label, "values": runs[0]["values"], "seeds": len(runs)}
        row["seconds"] = _stats([r["seconds"] for r in runs])
        if "ppo" in runs[0]:
            for key in PPO_METRICS:
                row[key] = _stats([r["ppo"][key] for r in runs])
            if init is not None:
                row["alignment_tax"] = _stats([r["ppo"]["pretrain_nll"] - init["pretrain_nll"] for r in runs])
                row["gold_win_rate_vs_init"] = _stats(
                    [evaluate.win_rate(r["ppo"]["gold_per_prompt"], init["gold_per_prompt"]) for r in runs]
                )
        if "rm" in runs[0]:
            for key in ("val_accuracy", "val_loss", "val_gold_accuracy"):
                row[key] = _stats([r["rm"][key] for r in runs])
            row["rm_curves"] = [
                [
                    {**c, "epoch": c["step"] / r["rm"]["total_steps"] * (r["rm"]["epochs"] or 1.0)}
                    for c in r["rm"]["curve"]
                ]
                for r in runs
            ]  # the x-axis of the curves: epochs of the comparisons (fractions of the run when steps were set)
        if "best_of_n" in runs[0]:
            row["best_of_n"] = _best_of_n_summary(runs)
            if "ppo" in runs[0]:
                row["rl"] = _rl_summary(runs, config.rl_window)
        points.append(row)
    out: dict[str, Any] = {"name": config.name, "points": points}
    if init is not None:
        out["init"] = {k: init[k] for k in PPO_METRICS}
    return out


def _best_of_n_summary(runs: list[dict]) -> dict[str, Any]:
    """Mean over seeds per n, and the fit of R = gold - gold(n = 1) against d on every seed's points."""
    table = []
    for i, first in enumerate(runs[0]["best_of_n"]):
        rows = [r["best_of_n"][i] for r in runs]
        table.append({"n": first["n"], "kl": first["kl"]} | {
            k: _stats([row[k] for row in rows]) for k in ("rm_pick_gold", "rm_pick_score", "oracle_gold")
        })  # fmt: skip
    d, gold = [], []
    for r in runs:
        g0 = r["best_of_n"][0]["rm_pick_gold"]
        d += [math.sqrt(row["kl"]) for row in r["best_of_n"]]
        gold += [row["rm_pick_gold"] - g0 for row in r["best_of_n"]]
    return {"table": table, "fit": _fit_or_none(fit_bon, d, gold)}


def _rl_summary(runs: list[dict], window: int) -> dict[str, Any]:
    """PPO's binned (d, gold, proxy) per seed, relative to best-of-1 of the same seed, and the RL fit."""
    per_seed = []
    for r in runs:
        first = r["best_of_n"][0]
        per_seed.append(rl_points(r["ppo"]["curve"], first["rm_pick_gold"], first["rm_pick_score"], window))
    d = [x for s in per_seed for x in s["d"]]
    gold = [x for s in per_seed for x in s["gold"]]
    return {"per_seed": per_seed, "fit": _fit_or_none(fit_rl, d, gold)}


def _fit_or_none(fit, d: list[float], r: list[float]) -> dict[str, float] | None:
    """The fit, or None where there are too few points (a short smoke run): the table shows "–"."""
    try:
        return fit(d, r)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------- table
METRIC_NAMES = {
    "gold_score": "gold score",
    "rm_score": "RM score",
    "alignment_tax": "alignment tax (Δ NLL)",
    "kl_to_init": "KL to PPO init",
    "gold_win_rate_vs_init": "gold win vs init",
    "pretrain_nll": "pretraining NLL",
    "stop_rate": "stops",
    "response_words": "words",
    "val_accuracy": "val accuracy",
    "val_loss": "val log loss",
    "val_gold_accuracy": "gold accuracy",
}


def _pm(stat: dict, spec: str = ".3f") -> str:
    return f"{stat['mean']:{spec}} ± {stat['std']:{spec}}"


def table(config: Any, summary: dict) -> str:
    """The sweep's markdown table: a row per point, mean ± standard deviation over its seeds."""
    points = summary["points"]
    if config.figure == "overoptimization":
        head = "| point | seeds | RM val accuracy | best-of-n peak gold (n) | α_bon | β_bon | R²_bon | α_RL | β_RL "
        head += "| R²_RL"
        lines = [head + " |", "|---" * 10 + "|"]
        for p in points:
            bon, rl = p["best_of_n"], p.get("rl")
            peak = max(bon["table"], key=lambda row: row["rm_pick_gold"]["mean"])
            cells = [p["label"], str(p["seeds"]), _pm(p["val_accuracy"]) if "val_accuracy" in p else "–"]
            cells += [f"{peak['rm_pick_gold']['mean']:.3f} ({peak['n']})"]
            for fit in (bon["fit"], rl["fit"] if rl else None):
                cells += [f"{fit['alpha']:.3f}", f"{fit['beta']:.3f}", f"{fit['r2']:.2f}"] if fit else ["–"] * 3
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    metrics = list(config.metrics)
    lines = ["| point | seeds | " + " | ".join(METRIC_NAMES.get(m, m) for m in metrics) + " | minutes per run |"]
    lines.append("|---" * (len(metrics) + 3) + "|")
    if "init" in summary:
        init = summary["init"]
        cells = [f"{init[m]:.3f}" if m in init else ("0.000" if m == "alignment_tax" else "–") for m in metrics]
        lines.append("| PPO init (the start) | – | " + " | ".join(cells) + " | – |")
    for p in points:
        cells = [_pm(p[m]) if m in p else "–" for m in metrics]
        minutes = p["seconds"]["mean"] / 60
        lines.append(f"| {p['label']} | {p['seeds']} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- figure
def plot(config: Any, summary: dict, path: pathlib.Path) -> None:
    """``figure.png`` of the sweep's kind; every error bar is ± one standard deviation over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = {"sweep": _plot_sweep, "curves": _plot_rm_curves, "overoptimization": _plot_overoptimization}
    if config.figure not in kinds:
        raise ValueError(f"config.figure={config.figure!r}: one of {sorted(kinds)}")
    fig = kinds[config.figure](plt, config, summary)
    fig.suptitle(config.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sweep(plt, config, summary):
    metrics = list(config.metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.1), squeeze=False)
    series: dict[Any, list[dict]] = {}
    for p in summary["points"]:
        series.setdefault(p["values"].get(config.series) if config.series else None, []).append(p)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for value, points in series.items():
            points = sorted(points, key=lambda p: p["values"][config.x])
            x = [p["values"][config.x] for p in points]
            mean = [p[metric]["mean"] for p in points]
            std = [p[metric]["std"] for p in points]
            label = f"{config.series.split('.')[-1]} = {value}" if config.series else None
            ax.errorbar(x, mean, yerr=std, marker="o", ms=4, capsize=3, lw=1.2, label=label)
        init = summary.get("init", {})
        if metric in init or metric == "alignment_tax":
            ax.axhline(init.get(metric, 0.0), color="gray", ls="--", lw=0.8, label="PPO init")
        if config.x_scale == "symlog":
            values = sorted({p["values"][config.x] for p in summary["points"]} - {0})
            linthresh = values[0] if values else 1.0
            ax.set_xscale("symlog", linthresh=linthresh)
            ax.set_xlim(left=-0.3 * linthresh)  # no negative half: the swept values are >= 0
        elif config.x_scale:
            ax.set_xscale(config.x_scale)
        if config.x_scale:  # the swept values themselves as the ticks, not a log axis' decades
            ticks = sorted({p["values"][config.x] for p in summary["points"]})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
            ax.minorticks_off()
        ax.set_xlabel(config.x.split(".", 1)[1])
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.legend(fontsize=7)
    return fig


def _plot_rm_curves(plt, config, summary):
    metrics = [m for m in config.metrics if m.startswith("val_")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.1), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for p in summary["points"]:
            curves = p["rm_curves"]
            epochs = [c["epoch"] for c in curves[0]]
            values = np.asarray([[c[metric] for c in curve] for curve in curves])  # [seeds, evaluations]
            mean, std = values.mean(axis=0), values.std(axis=0)
            line = ax.plot(
                epochs, mean, marker="o", ms=3, lw=1.2, label=dict(config.labels).get(p["label"], p["label"])
            )
            ax.fill_between(epochs, mean - std, mean + std, color=line[0].get_color(), alpha=0.2)
        ax.set_xlabel("epochs of the comparison data")
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.legend(fontsize=7)
    return fig


def _plot_overoptimization(plt, config, summary):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, p in enumerate(summary["points"]):
        color = f"C{i}"
        label = dict(config.labels).get(p["label"], p["label"])
        table = p["best_of_n"]["table"]
        d = np.sqrt([row["kl"] for row in table])
        g0, s0 = table[0]["rm_pick_gold"]["mean"], table[0]["rm_pick_score"]["mean"]
        gold = np.asarray([row["rm_pick_gold"]["mean"] for row in table]) - g0
        axes[0].errorbar(d, gold, yerr=[row["rm_pick_gold"]["std"] for row in table], color=color, marker="o",
                         ms=3, lw=0, elinewidth=1, capsize=2, label=f"{label}: gold")  # fmt: skip
        proxy = np.asarray([row["rm_pick_score"]["mean"] for row in table]) - s0
        axes[0].plot(d, proxy, color=color, ls=":", lw=1, label=f"{label}: proxy (RM)")
        fit, grid = p["best_of_n"]["fit"], np.linspace(0, d.max(), 50)
        if fit:
            axes[0].plot(grid, grid * (fit["alpha"] - fit["beta"] * grid), color=color, lw=1.2)
        if "rl" in p:
            rl = p["rl"]
            for s, seed in enumerate(rl["per_seed"]):
                axes[1].plot(seed["d"], seed["gold"], color=color, marker="o", ms=2, lw=0,
                             label=f"{label}: gold" if s == 0 else None)  # fmt: skip
                axes[1].plot(seed["d"], seed["proxy"], color=color, ls=":", lw=0.8,
                             label=f"{label}: proxy (RM)" if s == 0 else None)  # fmt: skip
            top = max((max(seed["d"], default=0.0) for seed in rl["per_seed"]), default=0.0)
            grid = np.linspace(1e-3, max(top, 2e-3), 80)
            if rl["fit"]:
                fit = rl["fit"]
                axes[1].plot(grid, grid * (fit["alpha"] - fit["beta"] * np.log(grid)), color=color, lw=1.2)
    for ax, title in zip(axes, ("best-of-n (fit: d(α - βd))", "PPO (fit: d(α - β log d))"), strict=True):
        ax.axhline(0, color="gray", lw=0.6)
        ax.set_xlabel("d = sqrt(KL to the initial policy)")
        ax.set_ylabel("score - initial policy's")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    return fig

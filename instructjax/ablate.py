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
  deviation), ``table.md`` and ``figure.png`` (error bars: ± one standard deviation over the seeds), made by
  ``ablate_report`` (the summary, Gao et al.'s fits, the table and the three kinds of figure).
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import pathlib
import time
import traceback
from typing import Any

import ml_collections

from instructjax import evaluate, loop, metrics, reward, stages, train_ppo, train_rm
from instructjax.ablate_report import plot, summarize, table
from instructjax.data import world_tasks
from instructjax.stage import finished_summary, load_stage

UPSTREAM = ("base", "sft", "rm", "ppo_init")
STEPS = ("rm", "best_of_n", "ppo")  # what a point can train or measure, in this order


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
    finished = finished_summary(rm_dir)
    summary = finished or train_rm.train(point.rm, rm_dir)
    if summary["status"] != "done":
        raise loop.Preempted(f"{rm_dir} was preempted at step {summary['step']}")
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
    policy = load_stage(point.upstream / "ppo_init", best=True)
    rm = reward.load_reward_model(point.ppo.rm_from)
    prompts = _prompts(point.upstream, point.eval.bon_prompts)
    ns = [int(n) for n in point.eval.bon_ns]
    # best_of_n draws sample s with seed + s: seeds 1,000 apart give each point's seeds disjoint samples
    return reward.best_of_n(rm, policy, prompts, world_tasks.gold_score, ns, seed=1000 * point.seed)


def _train_ppo(point: Point) -> dict[str, Any]:
    ppo_dir = point.workdir / "ppo"
    finished = finished_summary(ppo_dir)
    if finished is None and train_ppo.train(point.ppo, ppo_dir)["status"] != "done":
        raise loop.Preempted(f"{ppo_dir} was preempted")
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
    stage = load_stage(policy_dir, best=is_init)
    reference = stage if is_init else load_stage(init_dir, best=True)
    prompts, heldout = _prompts(upstream, eval_config.prompts), upstream / "world" / "pretrain_heldout.jsonl"
    sizes = (eval_config.kl_prompts, eval_config.max_new_tokens, eval_config.batch_size)
    result = evaluate.measure_policy(stage, reference, rm, prompts, heldout, *sizes)
    result["kl_to_init"] = result.pop("kl_to_reference")
    result["kl_to_init_se"] = result.pop("kl_to_reference_se")
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
            except Exception as error:  # reported with the point's log; the other points go on
                yield point, error
        return
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_point, point): point for point in todo}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.exception() or future.result()

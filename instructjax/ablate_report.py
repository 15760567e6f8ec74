"""The analysis of an ablation sweep's results (``ablate.run`` calls it): each point's metrics over its seeds
(``summarize``), Gao et al.'s fits (``fit_bon``, ``fit_rl``, on ``rl_points``), the markdown ``table`` and the
``plot``.

Three kinds of figure (``config.figure``): ``sweep`` (metrics against ``config.x``, a line per value of
``config.series``), ``curves`` (RM validation metrics over training) and ``overoptimization`` (Gao et al.:
gold and proxy score against d = sqrt(KL) for best-of-n and PPO, with the fits of ``fit_bon``/``fit_rl``).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from instructjax import evaluate

PPO_METRICS = ("gold_score", "rm_score", "kl_to_init", "pretrain_nll", "stop_rate", "response_words")


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
        table.append(
            {"n": first["n"], "kl": first["kl"]}
            | {k: _stats([row[k] for row in rows]) for k in ("rm_pick_gold", "rm_pick_score", "oracle_gold")}
        )
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
        axes[0].errorbar(
            d,
            gold,
            yerr=[row["rm_pick_gold"]["std"] for row in table],
            color=color,
            marker="o",
            ms=3,
            lw=0,
            elinewidth=1,
            capsize=2,
            label=f"{label}: gold",
        )
        proxy = np.asarray([row["rm_pick_score"]["mean"] for row in table]) - s0
        axes[0].plot(d, proxy, color=color, ls=":", lw=1, label=f"{label}: proxy (RM)")
        fit, grid = p["best_of_n"]["fit"], np.linspace(0, d.max(), 50)
        if fit:
            axes[0].plot(grid, grid * (fit["alpha"] - fit["beta"] * grid), color=color, lw=1.2)
        if "rl" in p:
            rl = p["rl"]
            for s, seed in enumerate(rl["per_seed"]):
                axes[1].plot(
                    seed["d"],
                    seed["gold"],
                    color=color,
                    marker="o",
                    ms=2,
                    lw=0,
                    label=f"{label}: gold" if s == 0 else None,
                )
                axes[1].plot(
                    seed["d"],
                    seed["proxy"],
                    color=color,
                    ls=":",
                    lw=0.8,
                    label=f"{label}: proxy (RM)" if s == 0 else None,
                )
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

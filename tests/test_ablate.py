"""Ablation sweeps (instructjax/ablate.py, ablate_report.py): Gao et al.'s fits, the points and their shared
directories. A small sweep end to end runs in test_stages.py, on the quick job's stages as its upstream."""

import math
import pathlib

import numpy as np
import pytest
from conftest import load_config

from instructjax import ablate, ablate_report

SWEEPS = ("ptx_coef", "kl_coef", "ppo_lr", "episodes", "rm_batching", "overoptimization")


def test_fits_recover_gao_forms():
    d = np.linspace(0.1, 3.0, 12)
    bon = ablate_report.fit_bon(d, d * (0.4 - 0.15 * d))
    assert bon["alpha"] == pytest.approx(0.4) and bon["beta"] == pytest.approx(0.15) and bon["r2"] == pytest.approx(1)
    assert bon["peak_d"] == pytest.approx(0.4 / 0.3) and bon["peak_r"] == pytest.approx(0.4**2 / 0.6)
    rl = ablate_report.fit_rl(np.r_[0.0, d], np.r_[0.0, d * (0.3 - 0.2 * np.log(d))])  # d = 0 is left out (log 0)
    assert rl["alpha"] == pytest.approx(0.3) and rl["beta"] == pytest.approx(0.2) and rl["r2"] == pytest.approx(1)
    assert rl["peak_d"] == pytest.approx(math.exp(0.3 / 0.2 - 1)) and rl["peak_r"] == pytest.approx(0.2 * rl["peak_d"])
    rng = np.random.default_rng(0)
    noisy = ablate_report.fit_bon(d, d * (0.4 - 0.15 * d) + rng.normal(0, 0.05, d.shape))
    assert 0.0 < noisy["r2"] < 1.0
    with pytest.raises(ValueError, match="at least 3 points"):
        ablate_report.fit_bon([0.1, 0.2], [0.0, 0.1])


def test_rl_points_bin_the_rollout_curve():
    curve = [{"kl": k, "gold_score": 0.2 + k / 10, "rm_score": k} for k in (0.0, 1.0, 4.0, 4.0, 9.0)]
    out = ablate_report.rl_points(curve, gold0=0.2, proxy0=0.0, window=2)  # the fifth row is an incomplete window
    assert out["d"] == pytest.approx([math.sqrt(0.5), 2.0]) and out["gold"] == pytest.approx([0.05, 0.4])
    assert out["proxy"] == pytest.approx([0.5, 4.0])


def _sweep(name: str, upstream: pathlib.Path):
    config = load_config(f"configs/ablations/{name}.py")
    config.upstream_dir = str(upstream)
    return config


def test_every_sweep_loads_and_equal_points_share_a_directory(tmp_path):
    points = {name: ablate.make_points(_sweep(name, tmp_path), tmp_path) for name in SWEEPS}
    for name, runs in points.items():
        assert len(runs) >= 3 * 2 and {p.seed for p in runs} == {0, 1, 2}, name
    dirs = {name: {p.workdir for p in runs} for name, runs in points.items()}
    ptx = tmp_path / "points" / "ppo" / "ppo.ptx_coef=1.0" / "seed1"
    assert ptx in dirs["ptx_coef"] and ptx in dirs["kl_coef"] and ptx in dirs["ppo_lr"] and ptx in dirs["episodes"]
    plain = tmp_path / "points" / "ppo" / "default" / "seed0"  # γ 0, β 0.3, LR 2e-4: the pipeline's ppo
    assert plain in dirs["ptx_coef"] and plain in dirs["kl_coef"] and plain in dirs["ppo_lr"]
    beta = next(p for p in points["kl_coef"] if p.label == "ppo.kl.init_coef=1.0,ppo.ptx_coef=1.0" and p.seed == 2)
    assert beta.ppo.kl.init_coef == 1.0 and beta.ppo.ptx_coef == 1.0 and beta.ppo.seed == 2
    assert beta.ppo.policy_from == str(tmp_path / "ppo_init") and beta.ppo.rm_from == str(tmp_path / "rm")
    gao = next(p for p in points["overoptimization"] if p.label == "rm.data.train_records=500" and p.seed == 1)
    assert gao.rm.data.train_records == 500 and gao.rm.seed == 1 and gao.ppo.rm_from == str(gao.workdir / "rm")
    assert gao.rm.init_from == str(tmp_path / "sft") and gao.rm.data.world_dir == str(tmp_path / "world")
    legend = dict(_sweep("rm_batching", tmp_path).labels)  # every point of the RM sweep has its legend text
    assert {p.label for p in points["rm_batching"]} == set(legend)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ppo.kl.init_coeff=0.1", "the ppo config has no field 'kl.init_coeff'"),
        ("kl.init_coef=0.1", "must start with one of"),
        ("ppo.ptx_coef", "is not key=value"),
        ("ppo.ptx_coef=high", "ppo.ptx_coef must be a float"),
        ("rm.data.pairs_as_examples=1", "must be True or False"),
    ],
)
def test_bad_points_are_refused_naming_the_point(tmp_path, spec, message):
    config = _sweep("ptx_coef", tmp_path)
    config.points = (spec,)
    with pytest.raises(ValueError, match=message):
        ablate.make_points(config, tmp_path)


def test_two_points_with_the_same_settings_are_refused(tmp_path):
    config = _sweep("ptx_coef", tmp_path)
    config.points = ("ppo.ptx_coef=1", "ppo.ptx_coef=1.0")
    with pytest.raises(ValueError, match="two points with the same settings"):
        ablate.make_points(config, tmp_path)

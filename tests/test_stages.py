"""The main job end to end on the quick preset; a rerun skips every finished stage."""

import json
import pathlib
import subprocess
import sys

import pytest
from conftest import REPO, load_config

from instructjax import stages, train_ppo, train_rm, train_sft


def test_quick_pipeline_end_to_end_and_rerun_skips(tmp_path, monkeypatch):
    config = load_config("configs/pipeline.py", "quick")
    results = stages.run(config, tmp_path)
    assert set(results["models"]) == {"base", "sft", "ppo_init", "ppo", "ppo_ptx"}
    sft = results["models"]["sft"]
    assert sft["gold_win_rate_vs_sft"] == sft["rm_win_rate_vs_sft"] == 0.5 and sft["kl_to_sft"] == 0.0
    for name, r in results["models"].items():
        assert 0.0 <= r["gold_score"] <= 1.0 and r["pretrain_nll"] > 0, name
        assert 0.0 <= r["gold_win_rate_vs_sft"] <= 1.0 and 0.0 <= r["rm_win_rate_vs_sft"] <= 1.0, name
        assert json.loads((tmp_path / name / "summary.json").read_text())["status"] == "done"
    assert json.loads((tmp_path / "results.json").read_text())["models"] == results["models"]
    report = (tmp_path / "report.md").read_text()
    assert "| sft |" in report and "training_curves.png" in report
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    assert (tmp_path / "ppo_vs_kl.png").exists() and "ppo_vs_kl.png" in report
    assert 0.0 <= results["rm"]["val_accuracy"] <= 1.0 and "Reward model" in report
    ppo_init = json.loads((tmp_path / "ppo_init" / "summary.json").read_text())
    assert "score" in ppo_init["final"]  # checkpoints selected by the RM score (§3.5)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(train_sft, "train", no_training)
    monkeypatch.setattr(train_rm, "train", no_training)
    monkeypatch.setattr(train_ppo, "train", no_training)
    again = stages.run(config, tmp_path)
    assert again["models"] == results["models"]  # same params, greedy decoding: the same evaluation

    sample = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/sample.py"),
            f"--workdir={tmp_path / 'sft'}",
            "--prompt=sort 5 2 9 =>",
            "--prompt=add 12 7 =>",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=pathlib.Path(tmp_path),
    )
    assert sample.stdout.count("->") == 2 and "sort 5 2 9 =>" in sample.stdout


def test_win_rate_counts_ties_half():
    from instructjax import evaluate

    assert evaluate.win_rate([1.0, 1.0, 0.0], [0.0, 0.0, 0.0]) == pytest.approx(2.5 / 3)
    assert evaluate.win_rate([0.2, 0.9], [0.5, 0.9]) == 0.25
    with pytest.raises(ValueError, match="paired scores"):
        evaluate.win_rate([1.0], [1.0, 2.0])

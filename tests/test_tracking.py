"""Optional Weights & Biases logging beside metrics.jsonl and TensorBoard: off by default, offline-capable,
the same run continued on resume, and a clear error when asked for without wandb installed."""

import json
import sys

import pytest
from conftest import load_config

from instructjax import loop, metrics


def test_wandb_is_off_by_default_and_switched_on_by_the_config():
    for path in ("configs/sft.py", "configs/rm.py", "configs/ppo.py", "configs/pipeline.py"):
        assert load_config(path).logging.wandb is False, path
    config = load_config("configs/sft.py")
    assert loop.settings(config, total_steps=1, select=("val_loss", "min")).wandb is None
    config.logging.wandb, config.logging.wandb_mode = True, "offline"
    tracked = loop.settings(config, total_steps=1, select=("val_loss", "min")).wandb
    assert tracked["mode"] == "offline" and tracked["project"] == "instructjax"
    assert tracked["config"]["optim"]["lr"] == config.optim.lr  # the whole stage config goes with the run


def test_asking_for_wandb_without_it_installed_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match="config.logging.wandb=True but wandb is not installed"):
        metrics.MetricsWriter(tmp_path, 2, wandb={"project": "p", "mode": "offline", "config": {}})


def test_offline_run_logs_and_a_resumed_stage_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (pip install wandb); CI does not install it")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracked = {"project": "instructjax-test", "mode": "offline", "config": {"lr": 0.1}}
    writer = metrics.MetricsWriter(tmp_path, 4, wandb=tracked, desc="sft")
    writer.write(1, {"loss": 2.5, "event": "text is not a scalar"})
    writer.write(2, {"loss": 2.0})
    writer.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob(f"run-{run_id}.wandb")), list((tmp_path / "wandb").iterdir())
    assert [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2.5, 2.0]

    writer = metrics.MetricsWriter(tmp_path, 4, resume_step=2, wandb=tracked, desc="sft")  # a resumed stage
    writer.write(3, {"loss": 1.5})
    writer.close()
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # two sessions of one run

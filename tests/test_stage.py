"""The stage workdir contract (instructjax/stage.py): config.json paths travel with the workdir."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from conftest import load_config

from instructjax import hf, stage, train_rm, train_sft

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


def test_paths_inside_the_job_are_relative_and_outside_absolute(tmp_path):
    job, elsewhere = tmp_path / "job", tmp_path / "data"
    config = {
        "data": {"world_dir": str(job / "world"), "tokenizer": str(elsewhere / "tok.json"), "cache_dir": ""},
        "init_from": str(job / "base"),
        "seed": 3,
    }
    written = stage.portable_paths(config, job / "sft")
    assert written["data"]["world_dir"] == os.path.join("..", "world")
    assert written["init_from"] == os.path.join("..", "base")
    assert written["data"]["tokenizer"] == str(elsewhere / "tok.json")  # outside the job: absolute
    assert written["data"]["cache_dir"] == "" and written["seed"] == 3  # empty and other entries untouched
    assert written["written_in"] == str(job / "sft")
    assert config["data"]["world_dir"] == str(job / "world")  # the argument is not changed


def test_a_moved_job_resolves_from_where_it_is_now(tmp_path):
    job = tmp_path / "job"
    (job / "world").mkdir(parents=True)
    (job / "sft").mkdir()
    stage.write_config(job / "sft", {"data": {"world_dir": str(job / "world")}, "init_from": str(job / "base")})
    moved = tmp_path / "moved"
    shutil.move(job, moved)
    config = stage.read_config(moved / "sft")
    assert config.data.world_dir == str(moved / "world")
    # A path that exists nowhere now resolves against the new location (the error then names it).
    assert config.init_from == str(moved / "base")


def test_a_stage_moved_away_from_its_job_falls_back_to_where_it_ran(tmp_path):
    job = tmp_path / "job"
    (job / "world").mkdir(parents=True)
    (job / "sft").mkdir()
    stage.write_config(job / "sft", {"data": {"world_dir": str(job / "world")}})
    shutil.move(job / "sft", tmp_path / "sft_alone")
    assert stage.read_config(tmp_path / "sft_alone").data.world_dir == str(job / "world")


def test_a_workdir_written_before_portable_paths_still_reads_cwd_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "workdirs" / "job" / "world").mkdir(parents=True)
    (tmp_path / "workdirs" / "job" / "sft").mkdir()
    legacy = {"data": {"world_dir": "workdirs/job/world"}}  # relative to the directory the job ran from
    (tmp_path / "workdirs" / "job" / "sft" / "config.json").write_text(json.dumps(legacy))
    monkeypatch.chdir(tmp_path)
    assert stage.read_config("workdirs/job/sft").data.world_dir == str(tmp_path / "workdirs" / "job" / "world")


def test_an_imported_model_loads_after_its_job_moved_and_from_another_directory(tmp_path, monkeypatch):
    hf.import_to_workdir(FIXTURES / "gpt2", tmp_path / "job" / "base")
    written = json.loads((tmp_path / "job" / "base" / "config.json").read_text())
    assert written["data"]["tokenizer"] == "tokenizer"  # inside the workdir: relative to it
    shutil.move(tmp_path / "job", tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")  # another working directory
    loaded = stage.load_stage(tmp_path / "moved" / "base")
    assert loaded.tokenizer.eos_id is not None
    [(text, stopped)] = stage.sample_texts(loaded, ["hello"], max_new_tokens=4)
    assert isinstance(text, str) and isinstance(stopped, bool)


def test_a_training_stage_needs_its_data_directory():
    with pytest.raises(ValueError, match="config.data.world_dir is not set"):
        stage.data_paths({"world_dir": "", "tokenizer": "tok.json"})
    paths = stage.data_paths({"world_dir": "", "tokenizer": "tok.json"}, need_data=False)
    assert paths.tokenizer == pathlib.Path("tok.json")


@pytest.mark.parametrize(
    "config_file, preset, length",
    [("configs/sft.py", "tiny", 512), ("configs/rm.py", "tiny", 200), ("configs/sft.py", "base", 129)],
)
def test_a_sequence_longer_than_the_models_positions_is_refused_before_anything_runs(
    tmp_path, config_file, preset, length
):
    config = load_config(config_file, preset)
    config.data.max_len = length  # the tiny model has 128 learned positions
    train = train_rm.train if config_file.endswith("rm.py") else train_sft.train
    with pytest.raises(ValueError, match=rf"config.data.max_len={length} exceeds the model's 128 positions"):
        train(config, tmp_path / "stage")
    assert not (tmp_path / "stage").exists()  # refused before the workdir was made


def test_padding_far_beyond_the_longest_row_is_reported(capsys):
    batches = [{"mask": np.array([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]])}]
    assert stage.report_padding("sft", batches, 8) == 3
    assert "longest validation sequence has 3 tokens" in capsys.readouterr().out
    assert stage.report_padding("sft", batches, 5) == 3
    assert capsys.readouterr().out == ""  # 3 of 5: nothing to say


@pytest.mark.parametrize(
    "config_file, updates, message",
    [
        ("configs/sft.py", {"batch_size": 0}, r"config.batch_size=0 must be > 0"),
        ("configs/sft.py", {"optim.lr": -1e-3}, r"config.optim.lr=-0.001 must be >= 0"),
        ("configs/sft.py", {"num_epochs": 0.0}, r"num_epochs and config.num_steps are both 0"),
        ("configs/sft.py", {"data.ptx_fraction": 1.0}, r"ptx_fraction=1.0 must be in \[0, 1\)"),
        ("configs/sft.py", {"eval_batch_size": -8}, r"config.eval_batch_size=-8 must be > 0"),
        ("configs/rm.py", {"data.k_max": 1}, r"k_max=1: a ranking compares at least 2"),
        ("configs/rm.py", {"optim.grad_accum_steps": 0}, r"config.optim.grad_accum_steps=0 must be > 0"),
    ],
)
def test_a_config_that_makes_no_sense_fails_before_anything_is_built(tmp_path, config_file, updates, message):
    config = load_config(config_file, "tiny")
    config.update_from_flattened_dict(updates)
    train = train_rm.train if config_file.endswith("rm.py") else train_sft.train
    with pytest.raises(ValueError, match=message):
        train(config, tmp_path / "stage")
    assert not (tmp_path / "stage").exists()

"""SFT / pretraining stage: learning, exact resume after a crash or SIGTERM, mesh change, NaN policy."""

import json
import os
import signal

import jax
import numpy as np
import pytest
from conftest import kill_after_checkpoint, load_config

from instructjax import checkpoint, steps, train_sft
from instructjax.metrics import read_metrics


def sft_config(world, **overrides):
    config = load_config("configs/sft.py", overrides.pop("preset", "tiny"))
    config.data.world_dir = str(world)
    config.update_from_flattened_dict(
        {"num_steps": 8, "log_every": 2, "eval_every": 4, "checkpoint_every": 4, "batch_size": 8, **overrides}
    )
    return config


def final_params(config, workdir):
    _, abstract = _abstract(config)
    return checkpoint.load_params(workdir, abstract, jax.tree.map(lambda _: None, abstract))


def _abstract(config):
    from instructjax.model import ModelConfig, Transformer

    model = Transformer(ModelConfig.from_dict(config.model))
    import flax.linen as nn

    return model, jax.eval_shape(
        lambda r: nn.unbox(model.init(r, np.zeros((1, 8), np.int32))["params"]), jax.random.key(0)
    )


def assert_same_params(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))


def preempt_at(step_to_stop):
    """A ``check_finite`` that sends this process SIGTERM after step ``step_to_stop`` (a preemption notice)."""
    real_check = steps.check_finite

    def check(step, metrics):
        real_check(step, metrics)
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)

    return check


@pytest.fixture(scope="module")
def straight_run(small_world, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    config = sft_config(small_world)
    summary = train_sft.train(config, workdir)
    return config, workdir, summary


@pytest.mark.slow
def test_sft_learns_and_writes_a_self_describing_workdir(small_world, tmp_path):
    config = sft_config(small_world, num_steps=40, eval_every=5, checkpoint_every=20, **{"optim.lr": 3e-3})
    summary = train_sft.train(config, tmp_path)
    evals = [r for r in read_metrics(tmp_path) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3  # step 5 -> step 40
    assert evals[-1]["val_loss"] < np.log(512) - 2  # far below a uniform guess over the vocabulary
    assert summary["status"] == "done" and summary["step"] == 40
    assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 64
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    rows = read_metrics(tmp_path)
    assert any(r.get("event") == "compiled" and r["compile_seconds"] > 0 for r in rows)
    train_rows = [r for r in rows if "tokens_per_s" in r]
    assert all(r["mfu"] > 0 and r["lr"] > 0 for r in train_rows)
    best = min(evals, key=lambda r: r["val_loss"])
    assert summary["best_step"] == best["step"] and checkpoint.final_step(tmp_path / "../" / tmp_path.name) == 40
    assert (tmp_path / "best" / str(best["step"])).exists()


@pytest.mark.slow
def test_crash_then_rerun_resumes_exactly(straight_run, tmp_path, monkeypatch):
    config, straight_dir, _ = straight_run
    real_check = steps.check_finite

    def crash_at_step_6(step, metrics):
        if step == 6:
            raise RuntimeError("simulated crash")
        real_check(step, metrics)

    monkeypatch.setattr(steps, "check_finite", crash_at_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sft.train(config, tmp_path)
    assert checkpoint.final_step(tmp_path) == 4  # the crash lost only the work since the last checkpoint
    monkeypatch.setattr(steps, "check_finite", real_check)
    summary = train_sft.train(config, tmp_path)
    assert summary["step"] == 8
    assert_same_params(final_params(config, tmp_path), final_params(config, straight_dir))
    logged = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert logged == sorted(set(logged)) == [2, 4, 6, 8]  # no duplicate rows after the resume


@pytest.mark.slow
def test_sigterm_saves_and_rerun_finishes_identically(straight_run, tmp_path, monkeypatch, capsys):
    config, straight_dir, _ = straight_run
    real_check = steps.check_finite
    monkeypatch.setattr(steps, "check_finite", preempt_at(5))
    summary = train_sft.train(config, tmp_path)
    assert summary["status"] == "preempted" and checkpoint.final_step(tmp_path) == 5
    monkeypatch.setattr(steps, "check_finite", real_check)
    capsys.readouterr()
    assert train_sft.train(config, tmp_path)["status"] == "done"
    assert "[sft] resuming from step 5 of 8" in capsys.readouterr().out  # the rerun says where it picks up
    assert_same_params(final_params(config, tmp_path), final_params(config, straight_dir))


@pytest.mark.slow
def test_resume_on_a_different_mesh(straight_run, small_world, tmp_path, monkeypatch):
    config, straight_dir, _ = straight_run
    real_check = steps.check_finite
    monkeypatch.setattr(steps, "check_finite", preempt_at(4))
    train_sft.train(sft_config(small_world, mesh_shape=(1, 8, 1)), tmp_path)
    monkeypatch.setattr(steps, "check_finite", real_check)
    summary = train_sft.train(sft_config(small_world, mesh_shape=(2, 2, 2)), tmp_path)  # fsdp=8 -> 2x2x2
    assert summary["step"] == 8
    assert_same_params(final_params(config, tmp_path), final_params(config, straight_dir))


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step(small_world, tmp_path):
    config = sft_config(small_world, **{"optim.lr": float("inf")})
    with pytest.raises(FloatingPointError, match="non-finite values at step 1"):
        train_sft.train(config, tmp_path / "stop")
    config = sft_config(small_world, nan_policy="skip", num_steps=3, **{"optim.lr": float("inf")})
    train_sft.train(config, tmp_path / "skip")
    rows = [r for r in read_metrics(tmp_path / "skip") if "skipped_steps" in r]
    assert rows[-1]["skipped_steps"] == 3 and np.isfinite(rows[-1]["loss"])


@pytest.mark.slow
def test_pretraining_and_ptx_mix(small_world, tmp_path):
    base = sft_config(small_world, preset="base", num_steps=6, eval_every=3, **{"data.max_len": 64})
    summary = train_sft.train(base, tmp_path / "base")
    assert np.isfinite(summary["final"]["val_loss"])
    mixed = sft_config(small_world, preset="ppo_init", num_steps=4, init_from=str(tmp_path / "base"))
    train_sft.train(mixed, tmp_path / "ppo_init")
    row = [r for r in read_metrics(tmp_path / "ppo_init") if "ptx_loss" in r][-1]
    assert row["ptx_loss"] > 0 and row["sft_loss"] > 0
    # the pretraining text is ptx_fraction (0.1) of the objective, however long its rows are
    assert row["loss"] == pytest.approx(0.9 * row["sft_loss"] + 0.1 * row["ptx_loss"], rel=1e-5)
    # init_from really loaded the base model: the first SFT loss is far below a random model's log(512)
    assert row["ptx_loss"] < np.log(512)


@pytest.mark.slow
def test_five_steps_on_fsdp4_tensor2_match_one_device(small_world, tmp_path, monkeypatch):
    from instructjax import sharding

    real_make_mesh = sharding.make_mesh

    def losses_on(shape):
        if shape == (1, 1, 1):  # the whole run on one device: a mesh of only the first device
            monkeypatch.setattr(sharding, "make_mesh", lambda s: real_make_mesh(s, devices=jax.devices()[:1]))
        config = sft_config(small_world, num_steps=5, log_every=1, mesh_shape=shape, eval_every=100)
        train_sft.train(config, tmp_path / str(shape))
        monkeypatch.setattr(sharding, "make_mesh", real_make_mesh)
        return [r["loss"] for r in read_metrics(tmp_path / str(shape)) if "tokens_per_s" in r]

    one, sharded = losses_on((1, 1, 1)), losses_on((1, 4, 2))
    assert len(one) == 5
    np.testing.assert_allclose(sharded, one, atol=1e-5, rtol=0)


KILL_SCRIPT = """
import sys
from conftest import kill_after_checkpoint, load_config
from instructjax import train_sft
config = load_config("configs/sft.py", "tiny")
config.data.world_dir = sys.argv[1]
config.update_from_flattened_dict({"num_steps": 60, "checkpoint_every": 4, "eval_every": 1000, "batch_size": 8})
train_sft.train(config, sys.argv[2])
"""


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(small_world, tmp_path):
    config = sft_config(small_world, num_steps=60, checkpoint_every=4, eval_every=1000)
    train_sft.train(config, tmp_path / "straight")
    killed_at = kill_after_checkpoint(KILL_SCRIPT, [small_world, tmp_path / "killed"], tmp_path / "killed", 8)
    assert killed_at is not None and killed_at < 60, killed_at  # it really died mid-training
    assert train_sft.train(config, tmp_path / "killed")["step"] == 60
    for a, b in zip(
        jax.tree.leaves(final_params(config, tmp_path / "killed")),
        jax.tree.leaves(final_params(config, tmp_path / "straight")),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_config_fails_before_compiling(small_world, tmp_path):
    with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
        train_sft.train(sft_config(small_world, mesh_shape=(1, 3, 2)), tmp_path / "a")
    with pytest.raises(ValueError, match="config.batch_size=6 must be a multiple of 8"):
        train_sft.train(sft_config(small_world, batch_size=6), tmp_path / "b")
    with pytest.raises(KeyError, match="bogus.*cannot be added since the config is locked"):
        sft_config(small_world, **{"optim.bogus": 1})
    with pytest.raises(TypeError, match="lr"):
        sft_config(small_world, **{"optim.lr": "fast"})
    with pytest.raises(ValueError, match="config.data.world_dir is not set"):
        train_sft.train(load_config("configs/sft.py", "tiny"), tmp_path / "c")

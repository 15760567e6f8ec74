"""Reward-model stage: init from SFT, K-way batches, metrics, bias normalisation, resume, sharding."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kill_after_checkpoint, load_config

from instructjax import reward, scoring, stage, train_rm
from instructjax.data import formats, world_tasks
from instructjax.metrics import read_metrics


def rm_config(world_dir, init_from="", **overrides):
    config = load_config("configs/rm.py", overrides.pop("preset", "tiny"))
    config.data.world_dir = str(world_dir)
    config.init_from = str(init_from)
    config.update_from_flattened_dict(
        {"num_steps": 12, "log_every": 2, "eval_every": 6, "checkpoint_every": 4, "batch_size": 8, **overrides}
    )
    return config


@pytest.fixture(scope="module")
def rm_run(small_world, sft_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rm")
    config = rm_config(small_world, sft_dir)
    return config, workdir, train_rm.train(config, workdir)


def rm_params(config, workdir, best=False):
    return reward.load_reward_model(workdir, best=best).stage.params


def test_last_token_reads_the_eos_with_left_or_right_padding():
    values = jnp.arange(12.0).reshape(2, 6)
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])  # right-padded; left-padded prompt + response
    np.testing.assert_array_equal(scoring.last_token(values, mask), [2.0, 11.0])
    assert float(scoring.last_token(values, jnp.zeros((2, 6)))[0]) == 0.0  # an empty row reads position 0


@pytest.mark.slow
def test_rm_starts_from_sft_and_writes_metrics_and_bias(rm_run, sft_dir):
    config, workdir, summary = rm_run
    assert summary["status"] == "done" and summary["step"] == 12
    final = summary["final"]
    for key in ("val_loss", "val_accuracy", "val_reward_mean", "val_reward_std", "val_gold_accuracy"):
        assert np.isfinite(final[key]), key
    assert 0 <= final["val_accuracy"] <= 1 and 0 <= final["val_gold_accuracy"] <= 1
    params = rm_params(config, workdir)
    assert "lm_head" not in params and params["score_head"]["kernel"].shape == (64, 1)
    assert set(params) - {"score_head"} <= set(train_sft_params(sft_dir))
    info = json.loads((workdir / reward.BIAS_FILE).read_text())
    assert info["bias"] == summary["bias"] and info["demonstrations"] == 100


def train_sft_params(sft_dir):
    return stage.load_stage(sft_dir).params


@pytest.mark.slow
def test_init_from_sft_copies_the_body(small_world, sft_dir, tmp_path):
    config = rm_config(small_world, sft_dir, num_steps=1, **{"optim.lr": 0.0})
    train_rm.train(config, tmp_path)
    params, sft = rm_params(config, tmp_path), train_sft_params(sft_dir)
    for name in set(params) - {"score_head"}:
        for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(sft[name]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    std = float(np.std(np.asarray(params["score_head"]["kernel"])))
    assert 0.5 / np.sqrt(65) < std < 1.5 / np.sqrt(65)  # N(0, 1/(d_model+1))


@pytest.mark.slow
def test_normalised_demonstration_reward_is_zero(rm_run, small_world):
    _, workdir, _ = rm_run
    rm = reward.load_reward_model(workdir)
    rows, _ = formats.read_jsonl(small_world / "demos_train.jsonl", "demos")
    scores = reward.score_texts(rm, [r["prompt"] for r in rows], [r["completion"] for r in rows], batch_size=32)
    assert len(scores) == 100
    assert abs(scores.mean()) <= 0.01, scores.mean()  # the text path agrees with the bias computed in training
    assert scores.std() > 0


@pytest.mark.slow
def test_score_texts_ranks_as_the_training_path(rm_run, small_world):
    """The public scorer reproduces the validation accuracy the trainer logged."""
    _, workdir, summary = rm_run
    rm = reward.load_reward_model(workdir, best=False)
    rows, _ = formats.read_jsonl(small_world / "comparisons_valid.jsonl", "comparisons")
    correct = total = 0
    for row in rows:
        r = reward.score_texts(rm, [row["prompt"]] * len(row["completions"]), row["completions"], batch_size=16)
        for w, lose in formats.ranking_pairs(row["ranking"]):
            correct, total = correct + (r[w] > r[lose]), total + 1
    assert correct / total == pytest.approx(summary["final"]["val_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_rm_learns_the_labelers_preferences(small_world, tmp_path):
    """From scratch, a few epochs over 40 ranked prompts: validation log loss falls below log 2 (and, as the
    paper warns, rises again with more epochs: ``best`` keeps the minimum)."""
    config = rm_config(small_world, num_steps=20, eval_every=5, **{"optim.lr": 3e-3})
    summary = train_rm.train(config, tmp_path)
    best = min((r for r in read_metrics(tmp_path) if "val_loss" in r), key=lambda r: r["val_loss"])
    assert summary["best"] == best["val_loss"] < np.log(2) - 0.05, best
    assert best["val_accuracy"] > 0.6


@pytest.mark.slow
def test_shuffled_pairs_variant_runs_and_counts_pairs(small_world, sft_dir, tmp_path):
    config = rm_config(small_world, sft_dir, preset="tiny_pairs", num_steps=4, eval_every=4)
    summary = train_rm.train(config, tmp_path)
    rows, _ = formats.read_jsonl(small_world / "comparisons_train.jsonl", "comparisons")
    start = next(r for r in read_metrics(tmp_path) if r.get("event") == "start")
    assert start["train_examples"] == sum(len(formats.ranking_pairs(r["ranking"])) for r in rows)
    assert np.isfinite(summary["final"]["val_loss"])


@pytest.mark.slow
def test_five_steps_on_fsdp4_tensor2_match_one_device(small_world, sft_dir, tmp_path, monkeypatch):
    from instructjax import sharding

    real_make_mesh = sharding.make_mesh

    def losses_on(shape):
        if shape == (1, 1, 1):
            monkeypatch.setattr(sharding, "make_mesh", lambda s: real_make_mesh(s, devices=jax.devices()[:1]))
        config = rm_config(small_world, sft_dir, num_steps=5, log_every=1, mesh_shape=shape, eval_every=100)
        train_rm.train(config, tmp_path / str(shape))
        monkeypatch.setattr(sharding, "make_mesh", real_make_mesh)
        return [r["loss"] for r in read_metrics(tmp_path / str(shape)) if "tokens_per_s" in r]

    one, sharded = losses_on((1, 1, 1)), losses_on((1, 4, 2))
    assert len(one) == 5
    np.testing.assert_allclose(sharded, one, atol=1e-5, rtol=0)


KILL_SCRIPT = """
import sys
from test_train_rm import rm_config
from instructjax import train_rm
train_rm.train(rm_config(sys.argv[1], sys.argv[2], num_steps=40, eval_every=1000), sys.argv[3])
"""


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(small_world, sft_dir, tmp_path):
    config = rm_config(small_world, sft_dir, num_steps=40, eval_every=1000)
    train_rm.train(config, tmp_path / "straight")
    killed_at = kill_after_checkpoint(KILL_SCRIPT, [small_world, sft_dir, tmp_path / "killed"], tmp_path / "killed", 8)
    assert killed_at is not None and killed_at < 40, killed_at
    assert train_rm.train(config, tmp_path / "killed")["step"] == 40
    for a, b in zip(
        jax.tree.leaves(rm_params(config, tmp_path / "killed")),
        jax.tree.leaves(rm_params(config, tmp_path / "straight")),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    killed, straight = (json.loads((tmp_path / d / reward.BIAS_FILE).read_text()) for d in ("killed", "straight"))
    assert killed == straight


@pytest.mark.slow
def test_gold_accuracy_uses_the_world_gold_score(rm_run, small_world):
    """val_gold_accuracy recomputed from the texts with world_tasks.gold_score and the public scorer."""
    _, workdir, summary = rm_run
    rm = reward.load_reward_model(workdir, best=False)
    rows, _ = formats.read_jsonl(small_world / "comparisons_valid.jsonl", "comparisons")
    correct = total = 0
    for row in rows:
        r = reward.score_texts(rm, [row["prompt"]] * len(row["completions"]), row["completions"], batch_size=16)
        gold = [world_tasks.gold_score(row["prompt"], c, True) for c in row["completions"]]
        for i in range(len(gold)):
            for j in range(len(gold)):
                if gold[i] > gold[j]:
                    correct, total = correct + (r[i] > r[j]), total + 1
    assert correct / total == pytest.approx(summary["final"]["val_gold_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_bad_rm_config_errors(small_world, tmp_path):
    with pytest.raises(ValueError, match="needs head='scalar'"):
        train_rm.train(rm_config(small_world, **{"model.head": "lm"}), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_rm.train(rm_config(small_world, tmp_path / "nowhere"), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="reward_bias.json is missing"):
        reward.load_reward_model(tmp_path / "b")


@pytest.mark.slow
def test_policy_samples_labeled_and_rm_agreement(sft_dir, rm_dir, small_world, monkeypatch):
    """Labeling and agreement on controlled "samples" (the briefly trained test policy never stops): the
    correct answer, a wrong one, and one that does not stop, per prompt."""
    from instructjax import evaluate

    def fake_samples(stage, prompts, **kwargs):
        options = lambda p: [(" ".join(world_tasks.solve(p)), True), ("7", True), ("7 7", False)]
        return [options(p)[i % 3] for i, p in enumerate(prompts)]

    monkeypatch.setattr(evaluate, "sample_texts", fake_samples)
    policy = evaluate.load_stage(sft_dir)
    rows, _ = formats.read_jsonl(small_world / "prompts_valid.jsonl", "prompts")
    prompts = [r["prompt"] for r in rows[:8]]
    labeled = evaluate.label_policy_samples(policy, prompts, labeler_temperature=0.0, seed=1)
    assert labeled and all(formats.validate_row(r, "comparisons") == r for r in labeled)
    for r in labeled:
        assert "7 7" not in r["completions"]  # samples without EOS are dropped
        gold = [world_tasks.gold_score(r["prompt"], c, True) for c in r["completions"]]
        best = r["ranking"][0] if isinstance(r["ranking"][0], list) else [r["ranking"][0]]
        assert gold[best[0]] == max(gold)  # a noise-free labeler puts the highest gold score first
    # mix_with: the prompt's other completions come first and share the ranking; K stays at most k_max.
    others = {p: [f"other{j}" for j in range(6)] for p in prompts}
    mixed = evaluate.label_policy_samples(
        policy, prompts, labeler_temperature=0.0, seed=1, mix_with=others, mix_keep=3, k_max=5
    )
    assert len(mixed) == len(prompts)
    for r in mixed:
        formats.validate_row(r, "comparisons")  # a valid comparisons row (raises otherwise)
        assert r["completions"][:3] == ["other0", "other1", "other2"] and len(r["completions"]) <= 5
        assert len(r["completions"]) > 3  # the policy's own samples are there too
    result = evaluate.rm_agreement(reward.load_reward_model(rm_dir), policy, prompts, samples_per_prompt=3)
    assert result["pairs"] > 0 and 0.0 <= result["agreement"] <= 1.0
    assert set(result["by_family"]) <= {p.split()[0] for p in prompts}


def test_best_of_n_picks_by_the_rm(monkeypatch):
    """Controlled samples: sample s of prompt i is right when (i + s) % 4 == 0, a wrong "7" otherwise. An RM
    equal to the gold score picks as the oracle does; a constant RM picks at random (flat in n)."""
    prompts = [world_tasks.sample_prompt(random.Random(i)) for i in range(40)]

    def samples(stage, ps, seed, samples_per_prompt=1, **kwargs):  # prompt i's samples are items i·K .. i·K + K - 1
        k = samples_per_prompt
        return [
            (" ".join(world_tasks.solve(p)) if (i + s) % 4 == 0 else "7", True)
            for i, p in enumerate(ps)
            for s in range(k)
        ]

    def gold_rm(rm, ps, texts, stopped):
        return np.array([world_tasks.gold_score(*x) for x in zip(ps, texts, stopped, strict=True)])

    monkeypatch.setattr(reward, "sample_texts", samples)
    monkeypatch.setattr(reward, "score_texts", gold_rm)
    rows = reward.best_of_n(None, None, prompts, world_tasks.gold_score, ns=(1, 4, 8), draws=4)
    assert [r["n"] for r in rows] == [1, 4, 8] and rows[0]["kl"] == 0.0
    assert rows[1]["kl"] == pytest.approx(np.log(4) - 3 / 4)
    for r in rows:
        assert r["rm_pick_gold"] == pytest.approx(r["oracle_gold"])
    assert rows[0]["oracle_gold"] < rows[1]["oracle_gold"] <= rows[2]["oracle_gold"] == pytest.approx(1.0)
    monkeypatch.setattr(reward, "score_texts", lambda rm, ps, texts, stopped: np.zeros(len(ps)))
    flat = reward.best_of_n(None, None, prompts, world_tasks.gold_score, ns=(1, 8), draws=16)
    assert (
        abs(flat[1]["rm_pick_gold"] - flat[0]["rm_pick_gold"]) < 0.1 < flat[1]["oracle_gold"] - flat[1]["rm_pick_gold"]
    )

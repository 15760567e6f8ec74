"""PPO's set-up is one function (``ppo_setup.plan``) that training and the AOT path both call; checkpoint
selection scores validation responses as training rewards them. Nothing here trains."""

import pathlib

import ml_collections
import numpy as np
import pytest
from conftest import load_config

from instructjax import aot, ppo_setup, reward_fns, rollout, sharding, train_ppo
from instructjax.data import world_tasks
from instructjax.tokenizer import load_tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


def ppo_config(**updates):
    config = load_config("configs/ppo.py", "tiny_ptx")
    model = load_config("configs/model.py", "tiny").model
    with config.unlocked():
        config.aot = ml_collections.ConfigDict()  # what policy_from / rm_from would hold
        config.aot.policy_model = model.copy_and_resolve_references()
        config.aot.value_model = model.copy_and_resolve_references()
    config.aot.value_model.head = "scalar"
    config.update_from_flattened_dict(updates)
    return config


@pytest.fixture(scope="module")
def mesh_rules():
    return sharding.make_mesh((1, -1, 1)), sharding.as_rules(sharding.DEFAULT_RULES)


def test_training_and_aot_see_the_same_schedule(mesh_rules):
    mesh, rules = mesh_rules
    config = ppo_config(**{"optim.grad_accum_steps": 2, "value_optim.grad_accum_steps": 4})
    compiled = aot.ppo_plan(config, mesh, rules)
    cfgs = ppo_setup.model_configs(config.aot.policy_model, config.aot.value_model)
    trained = ppo_setup.plan(config, *cfgs, mesh, rules)
    micro = config.ppo_epochs * (config.batch_size // config.minibatch_size)
    assert trained.micro_per_iteration == compiled.micro_per_iteration == micro
    # The schedules count optimizer updates: micro-batches / grad_accum_steps (the AOT path once forgot this).
    assert trained.policy_updates == compiled.policy_updates == trained.total_steps * micro // 2
    assert trained.value_updates == compiled.value_updates == trained.total_steps * micro // 4
    steps = np.arange(0, trained.policy_updates + 1, 7)
    np.testing.assert_array_equal(
        [float(trained.policy_lr(s)) for s in steps], [float(compiled.policy_lr(s)) for s in steps]
    )
    assert trained.ptx_rows == compiled.ptx_rows > 0


@pytest.mark.parametrize(
    "updates, message",
    [
        ({"optim.grad_accum_steps": 3}, "grad_accum_steps=3 must divide"),
        ({"minibatch_size": 24}, "multiple of minibatch_size"),
        ({"ppo_epochs": 0}, "ppo_epochs=0 must be positive"),
        ({"reward": "oracle"}, "config.reward='oracle'"),
        ({"temperature": -1.0}, r"config.temperature=-1.0 must be > 0"),
        ({"minibatch_size": 0}, r"config.minibatch_size=0 must be > 0"),
        ({"value_optim.lr": -1e-3}, r"config.value_optim.lr=-0.001 must be >= 0"),
        ({"num_iterations": 0, "total_episodes": 0}, r"config.total_episodes=0 must be > 0"),
        ({"max_new_tokens": 120}, r"max_prompt_len \+ config.max_new_tokens=136 exceeds the policy's 128 positions"),
        ({"data.ptx_len": 256}, r"config.data.ptx_len=256 exceeds the policy's 128 positions"),
    ],
)
def test_both_paths_refuse_a_config_that_cannot_run(mesh_rules, updates, message):
    mesh, rules = mesh_rules
    config = ppo_config(**updates)
    with pytest.raises(ValueError, match=message):
        aot.ppo_plan(config, mesh, rules)
    with pytest.raises(ValueError, match=message):
        ppo_setup.plan(config, *ppo_setup.model_configs(config.aot.policy_model, config.aot.value_model), mesh, rules)


def test_model_configs_need_a_policy_and_a_reward_model():
    config = ppo_config()
    with pytest.raises(ValueError, match="config.policy_from must hold a policy"):
        ppo_setup.model_configs(config.aot.value_model, config.aot.value_model)
    with pytest.raises(ValueError, match="config.rm_from must hold a reward model"):
        ppo_setup.model_configs(config.aot.policy_model, config.aot.policy_model)
    other_vocabulary = config.aot.value_model.copy_and_resolve_references()
    other_vocabulary.vocab_size = 1024
    with pytest.raises(ValueError, match="vocabulary of 512 and config.rm_from of 1024"):
        ppo_setup.model_configs(config.aot.policy_model, other_vocabulary)


def test_selection_scores_what_training_optimises():
    config = ppo_config()
    scores, stopped = [0.5, 2.0, -0.2], [True, False, True]
    # The response without EOS gets the missing-EOS penalty, as in the rollouts, not its RM score.
    assert config.use_missing_eos_penalty
    expected = np.mean([0.5, config.missing_eos_penalty, -0.2])
    rm = reward_fns.parse("rm")
    assert train_ppo.validation_reward(config, rm, scores, stopped, None) == pytest.approx(expected)
    config.use_missing_eos_penalty = False
    assert train_ppo.validation_reward(config, rm, scores, stopped, None) == pytest.approx(np.mean(scores))
    gold = reward_fns.parse("gold", gold=lambda p, r, s: [1.0, 0.0, 0.5])  # the gold ablation selects on gold
    assert train_ppo.validation_reward(config, gold, scores, stopped, np.array([1.0, 0.0, 0.5])) == pytest.approx(0.5)
    # RM minus a length penalty: both parts, as rollout.score adds them
    mixed = reward_fns.parse("2*rm - 0.5*instructjax.reward_fns:response_words")
    host = np.array([-1.0, -0.5, -1.5])  # -0.5 × words
    assert train_ppo.validation_reward(config, mixed, scores, stopped, host) == pytest.approx(np.mean([0.0, 3.5, -1.9]))


def _host_rollout(**overrides):
    b, n = 4, 5
    mask = np.array([[1, 1, 1, 0, 0]] * b, np.int32)
    arrays = {k: np.zeros((b, n), np.float32) for k, _ in train_ppo.ROLLOUT_QUANTITIES if k != "scores"}
    arrays["scores"] = np.zeros((b,), np.float32)
    arrays.update(overrides)
    zeros = np.zeros((b, n), np.int32)
    return rollout.Rollout(
        prompt=zeros,
        prompt_mask=zeros,
        response=zeros,
        response_mask=mask,
        stopped=np.ones((b,), bool),
        entropy=np.zeros((b, n), np.float32),
        **arrays,
    )


def test_a_non_finite_rollout_stops_ppo_naming_the_iteration_and_the_quantity():
    train_ppo.check_rollout_finite(_host_rollout(), 3)  # finite: nothing to say
    padded = np.zeros((4, 5), np.float32)
    padded[:, 4] = np.nan  # in the padding after the response: masked out, not an error
    train_ppo.check_rollout_finite(_host_rollout(values=padded), 3)
    scores = np.array([0.1, np.nan, 0.2, np.inf], np.float32)
    with pytest.raises(
        FloatingPointError, match=r"non-finite scores \(the reward .*\) in the rollout of iteration 7: 2 of 4"
    ):
        train_ppo.check_rollout_finite(_host_rollout(scores=scores), 7)
    advantages = np.zeros((4, 5), np.float32)
    advantages[2, 1] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite advantages .* iteration 2: 1 of 12"):
        train_ppo.check_rollout_finite(_host_rollout(advantages=advantages), 2)


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path):
    world_tasks.write_tokenizer(tmp_path / "tokenizer.json")
    config = ppo_config(policy_from="runs/ppo_init", rm_from="runs/rm")
    policy_tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    ppo_setup.check_same_tokenizer(policy_tokenizer, tmp_path / "tokenizer.json", config)  # the same: fine
    with pytest.raises(ValueError, match="config.policy_from=runs/ppo_init and config.rm_from=runs/rm use different"):
        ppo_setup.check_same_tokenizer(policy_tokenizer, FIXTURES / "gpt2", config)

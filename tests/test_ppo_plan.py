"""PPO's set-up is one function (``train_ppo.plan``) that training and the AOT path both call; checkpoint
selection scores validation responses as training rewards them. Nothing here trains."""

import ml_collections
import numpy as np
import pytest
from conftest import load_config

from instructjax import aot, sharding, train_ppo


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
    cfgs = train_ppo.model_configs(config.aot.policy_model, config.aot.value_model)
    trained = train_ppo.plan(config, *cfgs, mesh, rules)
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
    ],
)
def test_both_paths_refuse_a_config_that_cannot_run(mesh_rules, updates, message):
    mesh, rules = mesh_rules
    config = ppo_config(**updates)
    with pytest.raises(ValueError, match=message):
        aot.ppo_plan(config, mesh, rules)
    with pytest.raises(ValueError, match=message):
        train_ppo.plan(config, *train_ppo.model_configs(config.aot.policy_model, config.aot.value_model), mesh, rules)


def test_model_configs_need_a_policy_and_a_reward_model():
    config = ppo_config()
    with pytest.raises(ValueError, match="head='lm'"):
        train_ppo.model_configs(config.aot.value_model, config.aot.value_model)


def test_selection_scores_what_training_optimises():
    config = ppo_config()
    scores, stopped = [0.5, 2.0, -0.2], [True, False, True]
    # The response without EOS gets the missing-EOS penalty, as in the rollouts, not its RM score.
    assert config.use_missing_eos_penalty
    expected = np.mean([0.5, config.missing_eos_penalty, -0.2])
    assert train_ppo.validation_reward(config, scores, stopped, None) == pytest.approx(expected)
    config.use_missing_eos_penalty = False
    assert train_ppo.validation_reward(config, scores, stopped, None) == pytest.approx(np.mean(scores))
    config.reward = "gold"  # the gold-reward ablation optimises (and so selects on) the gold score
    assert train_ppo.validation_reward(config, scores, stopped, [1.0, 0.0, 0.5]) == pytest.approx(0.5)

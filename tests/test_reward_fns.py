"""Rewards as functions (``reward_fns``) and PPO one iteration at a time (``ppo_session``): the spec parser,
the reward-function contract and its errors, and a notebook's session against ``train_ppo.train``."""

import json

import jax
import numpy as np
import pytest
from test_ppo import iteration_rows, ppo_config

from instructjax import checkpoint, ppo_session, reward_fns, train_ppo
from instructjax.reward_fns import RewardError


def length(prompts, responses, stopped):
    return [float(len(r)) for r in responses]


def test_specs_parse_into_weighted_terms():
    assert reward_fns.parse("rm").rm_weight == 1.0 and not reward_fns.parse("rm").host_terms
    spec = reward_fns.parse("rm - 0.05*instructjax.reward_fns:response_words + 2e-1 * instructjax.reward_fns:no_eos")
    assert spec.rm_weight == 1.0 and [(t.weight, t.name) for t in spec.host_terms] == [
        (-0.05, "instructjax.reward_fns:response_words"),
        (0.2, "instructjax.reward_fns:no_eos"),
    ]
    assert str(spec) == "rm - 0.05*instructjax.reward_fns:response_words + 0.2*instructjax.reward_fns:no_eos"
    ensemble = reward_fns.parse("0.5*rm + 0.5*rm")  # two RM terms add up (an ensemble of one RM, here)
    assert ensemble.rm_weight == 1.0
    assert reward_fns.parse(length).host_terms[0].name == "length"
    assert reward_fns.weighted((1.0, "rm"), (-1.0, length)).rm_weight == 1.0
    gold = reward_fns.parse("gold", gold=length)
    assert gold.rm_weight == 0.0 and gold.host_terms[0].fn is length


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gold", "needs the synthetic world's gold score"),
        ("rm +", "cannot read it from character"),
        ("rm rm", "cannot read it from character"),
        ("", "expected a non-empty string"),
        ("brevity", "expected 'rm', 'gold' or an import path"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("instructjax.reward_fns:nothing_here", "has no attribute 'nothing_here'"),
        ("instructjax.reward_fns:BUILTIN", "is not callable"),
    ],
)
def test_bad_specs_are_refused_saying_why(spec, message):
    with pytest.raises(RewardError, match=message):
        reward_fns.parse(spec)
    with pytest.raises(RewardError, match="finite"):
        reward_fns.weighted((float("nan"), "rm"))


@pytest.mark.parametrize(
    "returned, message",
    [
        ([1.0, 2.0], r"returned shape \(2,\); expected \(3,\)"),
        ([[1.0], [2.0], [3.0]], r"returned shape \(3, 1\)"),
        ([1.0, float("nan"), 0.0], "returned nan for row 1"),
        (["a", "b", "c"], "returned non-numbers"),
        (None, r"returned shape \(\)"),
    ],
)
def test_a_reward_function_breaking_the_contract_names_the_term_and_iteration(returned, message):
    bad = lambda prompts, responses, stopped: returned
    spec = reward_fns.weighted((1.0, "rm"), (1.0, bad))
    with pytest.raises(RewardError, match=f"PPO iteration 7: reward term '<lambda>' {message}"):
        reward_fns.host_scores(spec, ["p"] * 3, ["a", "bb", "ccc"], [True] * 3, "PPO iteration 7")


def test_host_scores_are_the_weighted_sum_and_none_for_the_rm_alone():
    spec = reward_fns.parse("2*instructjax.reward_fns:response_words - 3*instructjax.reward_fns:no_eos")
    got = reward_fns.host_scores(spec, ["p"] * 3, ["a b", "", "c d e"], [True, False, True], "here")
    np.testing.assert_array_equal(got, [4.0, -3.0, 6.0])
    assert reward_fns.host_scores(reward_fns.parse("rm"), ["p"], ["a"], [True], "here") is None

    def raises(prompts, responses, stopped):
        raise KeyError("boom")

    with pytest.raises(RewardError, match="here: reward term 'raises' raised KeyError"):
        reward_fns.host_scores(reward_fns.parse(raises), ["p"], ["a"], [True], "here")


@pytest.mark.slow
def test_a_session_steps_like_train_and_takes_a_custom_reward_beta_and_checkpoint(sft_dir, rm_dir, tmp_path):
    # Two iterations one at a time give exactly the params of train() running two.
    config = ppo_config(sft_dir, rm_dir, num_iterations=2, eval_every=100, checkpoint_every=100)
    train_ppo.train(config, tmp_path / "trained")
    session = train_ppo.setup(config, tmp_path / "session")
    first = ppo_session.step(session)
    ppo_session.step(session)
    trained = checkpoint.load_params(tmp_path / "trained", session.state.params, session.plan.state_sh.params)
    jax.tree.map(np.testing.assert_array_equal, trained, jax.device_get(session.state.params))
    assert first["iteration"] == 1 and [r["rm_score"] for r in session.history] == pytest.approx(
        [r["rm_score"] for r in iteration_rows(tmp_path / "trained")], abs=0
    )

    # The rollout, episode by episode; the score is the reward optimised.
    samples = ppo_session.rollout_samples(session, 4)
    assert len(samples) == 4 and {"prompt", "response", "stopped", "score", "kl", "reward", "advantage"} <= set(
        samples[0]
    )
    assert np.mean([s["score"] for s in ppo_session.rollout_samples(session)]) == pytest.approx(
        session.history[-1]["rm_score"], abs=1e-5
    )

    # A custom reward: the rollout's scores are exactly what the function returned.
    ppo_session.set_reward(session, length)
    ppo_session.step(session)
    samples = ppo_session.rollout_samples(session)
    assert [s["score"] for s in samples] == [float(len(s["response"])) for s in samples]
    # RM minus a length penalty: the RM part is what it was, the penalty is added on top.
    ppo_session.set_reward(session, reward_fns.weighted((1.0, "rm"), (-0.25, reward_fns.response_words)))
    ppo_session.step(session)
    assert session.history[-1]["finite"]

    # β changed mid-run: the next iteration uses it (the tiny presets fix β, so it stays).
    ppo_session.set_kl_coef(session, 0.05)
    ppo_session.step(session)
    assert session.history[-1]["kl_coef"] == pytest.approx(0.05)

    # A broken reward stops the iteration before any update, naming the iteration.
    ppo_session.set_reward(session, lambda p, r, s: [float("nan")] * len(r))
    before = session.state.step
    with pytest.raises(RewardError, match="PPO iteration 6: reward term '<lambda>' returned nan for row 0"):
        ppo_session.step(session)
    assert session.state.step == before

    # A checkpoint on request; train() on the same workdir resumes from it.
    assert ppo_session.save(session) == 5
    config.num_iterations = 6
    summary = train_ppo.train(config, tmp_path / "session")
    assert summary["step"] == 6
    start = [json.loads(line) for line in (tmp_path / "session" / "metrics.jsonl").read_text().splitlines()][0]
    assert start["resumed"] is True and start["step"] == 5


@pytest.mark.slow
def test_a_config_reward_spec_trains_and_a_bad_one_is_refused_before_loading(sft_dir, rm_dir, tmp_path):
    config = ppo_config(sft_dir, rm_dir, num_iterations=1, reward="rm - 0.1*instructjax.reward_fns:response_words")
    assert train_ppo.train(config, tmp_path / "ok")["status"] == "done"
    config = ppo_config(sft_dir, rm_dir, num_iterations=1, reward="rm - 0.1*nowhere:fn")
    with pytest.raises(ValueError, match=r"config.reward='rm - 0.1\*nowhere:fn': .*cannot import 'nowhere'"):
        train_ppo.train(config, tmp_path / "bad")

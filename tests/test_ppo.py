"""PPO: reward shaping, GAE, losses against NumPy; the first ratio; sharding; exact resume; PPO-ptx."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kill_after_checkpoint, load_config

from instructjax import checkpoint, losses, ppo_steps, rollout, scoring, train_ppo
from instructjax.metrics import read_metrics
from instructjax.model import ModelConfig, Transformer


def ppo_config(policy_from, rm_from, **overrides):
    config = load_config("configs/ppo.py", overrides.pop("preset", "tiny"))
    config.policy_from, config.rm_from = str(policy_from), str(rm_from)
    config.update_from_flattened_dict(
        {
            "num_iterations": 4,
            "batch_size": 16,
            "minibatch_size": 8,
            "eval_every": 100,
            "checkpoint_every": 2,
            "eval_prompts": 16,
            "eval_batch_size": 16,
            "max_new_tokens": 8,
            "optim.warmup_steps": 2,
            "ptx_ratio": 1,  # PPO-ptx with as many pretraining rows as episodes: the same code, faster tests
            "data.ptx_len": 32,
            **overrides,
        }
    )
    return config


def iteration_rows(workdir):
    return [r for r in read_metrics(workdir) if "rm_score" in r]


# ---------------------------------------------------------------------------- NumPy references
def random_rollout(seed=0, b=5, n=7):
    rng = np.random.RandomState(seed)
    lengths = np.array([7, 3, 1, 5, 7])[:b]  # rows 0 and 4 run to the limit (no EOS), row 2 is EOS only
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    return {
        "logprobs": rng.randn(b, n).astype(np.float32) * mask,
        "ref": rng.randn(b, n).astype(np.float32) * mask,
        "values": rng.randn(b, n).astype(np.float32) * mask,
        "scores": rng.randn(b).astype(np.float32),
        "mask": mask,
    }


def numpy_rewards(r, beta):
    out = -beta * (r["logprobs"] - r["ref"]) * r["mask"]
    for i, length in enumerate(r["mask"].sum(axis=1).astype(int)):
        out[i, length - 1] += r["scores"][i]
    return out


def numpy_gae(rewards, values, mask, gamma, lam):
    b, n = rewards.shape
    adv = np.zeros((b, n), np.float64)
    for i in range(b):
        length = int(mask[i].sum())
        last = 0.0
        for t in reversed(range(length)):
            next_v = values[i, t + 1] if t + 1 < length else 0.0
            delta = rewards[i, t] + gamma * next_v - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
    return adv, (adv + values) * mask


def test_kl_shaped_rewards_match_numpy():
    r = random_rollout()
    got = rollout.kl_shaped_rewards(r["logprobs"], r["ref"], r["scores"], r["mask"], jnp.float32(0.05))
    np.testing.assert_allclose(got, numpy_rewards(r, 0.05), atol=1e-6)
    assert np.all(np.asarray(got)[r["mask"] == 0] == 0)  # nothing after EOS


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_numpy_with_masks_and_rows_without_eos(gamma, lam):
    r = random_rollout(1)
    rewards = numpy_rewards(r, 0.02)
    adv, ret = rollout.gae(jnp.asarray(rewards), jnp.asarray(r["values"]), jnp.asarray(r["mask"]), gamma, lam)
    want_adv, want_ret = numpy_gae(rewards, r["values"], r["mask"], gamma, lam)
    np.testing.assert_allclose(adv, want_adv, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, atol=1e-5)


def test_whiten_matches_numpy_over_valid_tokens():
    r = random_rollout(2)
    x, m = r["values"] * 3 + 1, r["mask"]
    valid = x[m > 0]
    want = (x - valid.mean()) / np.sqrt(valid.var() + 1e-8) * m
    np.testing.assert_allclose(rollout.whiten(jnp.asarray(x), jnp.asarray(m)), want, atol=1e-5)
    kept = rollout.whiten(jnp.asarray(x), jnp.asarray(m), shift_mean=False)
    np.testing.assert_allclose(kept, (want + valid.mean()) * m, atol=1e-5)


def test_ppo_policy_and_value_losses_match_numpy():
    r = random_rollout(3)
    rng = np.random.RandomState(4)
    new_logp = r["logprobs"] + 0.3 * rng.randn(*r["mask"].shape).astype(np.float32)
    adv = rng.randn(*r["mask"].shape).astype(np.float32)
    m, eps = r["mask"], 0.2
    ratio = np.exp(new_logp - r["logprobs"])
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
    loss, stats = losses.ppo_policy_loss(new_logp, r["logprobs"], adv, m, eps)
    np.testing.assert_allclose(loss, (per_token * m).sum() / m.sum(), rtol=1e-5)
    clipped = -adv * np.clip(ratio, 1 - eps, 1 + eps) > -adv * ratio
    np.testing.assert_allclose(stats["clip_frac"], (clipped * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(
        stats["approx_kl"], (0.5 * (new_logp - r["logprobs"]) ** 2 * m).sum() / m.sum(), rtol=1e-5
    )

    values, returns = r["values"] + 0.5 * rng.randn(*m.shape), rng.randn(*m.shape)
    clip_v = r["values"] + np.clip(values - r["values"], -0.2, 0.2)
    want = 0.5 * (np.maximum((values - returns) ** 2, (clip_v - returns) ** 2) * m).sum() / m.sum()
    got, _ = losses.value_loss(jnp.asarray(values), r["values"], jnp.asarray(returns), m, 0.2)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    got, _ = losses.value_loss(jnp.asarray(values), r["values"], jnp.asarray(returns), m, 0.0)
    np.testing.assert_allclose(got, 0.5 * ((values - returns) ** 2 * m).sum() / m.sum(), rtol=1e-5)


def test_response_logprobs_and_entropy_match_numpy_over_the_full_logits():
    """The head reads only the positions that predict the response, a block at a time
    (``scoring.token_logprobs``): its log-probs and entropy equal a NumPy log-softmax of the full forward's
    logits at those positions."""
    cfg = ModelConfig.from_dict({**load_config("configs/model.py", "tiny").model.to_dict(), "dropout_rate": 0.0})
    model, p, n = Transformer(cfg), 5, 6
    rng = np.random.RandomState(0)
    tokens = rng.randint(1, cfg.vocab_size, (3, p + n)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[0, :2] = 0  # a left-padded prompt
    mask[1, p + 3 :] = 0  # a response that ended early
    params = model.init(jax.random.key(0), tokens[:, :4])["params"]
    logp, entropy = scoring.response_logprobs(model, params, tokens, mask, p, temperature=0.7)
    logits = np.asarray(model.apply({"params": params}, tokens, mask), np.float64)[:, p - 1 : -1] / 0.7
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    want = np.take_along_axis(log_softmax, tokens[:, p:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(logp, want, atol=2e-5)
    np.testing.assert_allclose(entropy, -(np.exp(log_softmax) * log_softmax).sum(-1), atol=2e-5)
    with pytest.raises(ValueError, match="prompt_len=0"):
        scoring.response_logprobs(model, params, tokens, mask, 0, temperature=1.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_logprobs_gradients_match_autodiff_of_the_plain_log_softmax(dtype):
    """The blocked head's custom VJP (logits recomputed per block) gives the gradients autodiff gives through
    the full [B,N,V] log-softmax, for cotangents on both the log-probs and the entropy, with N not a multiple
    of the block (padded positions) and a temperature."""
    rng = np.random.RandomState(1)
    b, n, d, v, temperature = 3, 7, 16, 50, 0.7
    hidden = jnp.asarray(rng.randn(b, n, d), dtype)
    unembed = jnp.asarray(rng.randn(v, d) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.randint(0, v, (b, n)), jnp.int32)
    g_logp, g_entropy = jnp.asarray(rng.randn(b, n)), jnp.asarray(rng.randn(b, n))

    def plain(h, w):
        z = jnp.einsum("bnd,vd->bnv", h, w.astype(h.dtype), preferred_element_type=jnp.float32) / temperature
        log_p = jax.nn.log_softmax(z, axis=-1)
        entropy = -(jnp.exp(log_p) * log_p).sum(-1)
        return jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0], entropy

    def blocked(h, w):
        return scoring.token_logprobs(h, w, targets, temperature, block_rows=9)  # 3 positions a block

    def objective(fn):
        return lambda h, w: sum((out * g).sum() for out, g in zip(fn(h, w), (g_logp, g_entropy), strict=True))

    for got, want in zip(blocked(hidden, unembed), plain(hidden, unembed), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    got = jax.grad(objective(blocked), argnums=(0, 1))(hidden, unembed)
    want = jax.grad(objective(plain), argnums=(0, 1))(hidden, unembed)
    tol = 1e-4 if dtype == "float32" else 5e-2  # bf16 hidden: its gradient is rounded to bf16 either way
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol)


def test_adaptive_kl_controller():
    kl = load_config("configs/ppo.py", "tiny").kl
    assert float(ppo_steps.kl_controller(kl, jnp.float32(0.02), jnp.float32(100.0), 512)) == pytest.approx(0.02)
    kl.mode, kl.target, kl.horizon = "adaptive", 6.0, 10_000
    up = float(ppo_steps.kl_controller(kl, jnp.float32(0.02), jnp.float32(12.0), 512))
    assert up == pytest.approx(0.02 * (1 + 0.2 * 512 / 10_000))  # error clipped at +0.2
    down = float(ppo_steps.kl_controller(kl, jnp.float32(0.02), jnp.float32(5.7), 512))
    assert down == pytest.approx(0.02 * (1 - 0.05 * 512 / 10_000), rel=1e-5)


# ---------------------------------------------------------------------------- the stage
@pytest.mark.slow
def test_first_update_ratio_is_exactly_one(sft_dir, rm_dir, tmp_path):
    """Same params, no dropout: the recomputed log-probs equal the rollout's, so ρ = 1 and KL(π‖π_ref) = 0."""
    config = ppo_config(sft_dir, rm_dir, num_iterations=1, **{"optim.lr": 0.0, "value_optim.lr": 0.0})
    train_ppo.train(config, tmp_path)
    (row,) = iteration_rows(tmp_path)
    assert row["ratio"] == 1.0 and row["clip_frac"] == 0.0
    # approx_kl is 0 up to float32 rounding of a log-prob on some token (8.9e-16 measured on this world)
    assert 0.0 <= row["approx_kl"] < 1e-12
    # The policy starts as the reference: the same computation on equal params, but in two compiled copies that
    # XLA may fuse differently (-3e-8 after the fused loss's new block order retrained the SFT fixture).
    assert abs(row["kl"]) < 1e-6


@pytest.mark.slow
def test_gold_reward_ablation_optimises_the_gold_score(sft_dir, rm_dir, tmp_path):
    train_ppo.train(ppo_config(sft_dir, rm_dir, num_iterations=2, reward="gold"), tmp_path)
    rows = iteration_rows(tmp_path)
    assert [r["rm_score"] for r in rows] == pytest.approx([r["gold_score"] for r in rows], abs=1e-6)


@pytest.mark.slow
def test_ppo_and_ptx_run_and_log_every_metric(sft_dir, rm_dir, tmp_path):
    summary = train_ppo.train(ppo_config(sft_dir, rm_dir, preset="tiny_ptx", eval_every=2), tmp_path)
    assert summary["status"] == "done" and summary["step"] == 4
    rows = iteration_rows(tmp_path)
    for key in (
        "rm_score",
        "gold_score",
        "kl",
        "entropy",
        "clip_frac",
        "approx_kl",
        "explained_variance",
        "ptx_loss",
        "response_length",
        "time_generate",
        "time_score",
        "time_update",
        "pg_loss",
        "value_loss",
        "kl_coef",
    ):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[-1]["ptx_loss"] > 0 and rows[-1]["kl_coef"] == pytest.approx(0.3)  # fixed β of the tiny presets
    evals = [r for r in read_metrics(tmp_path) if "val_rm_score" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all("val_gold_score" in r for r in evals)
    from instructjax import evaluate

    assert evaluate.load_stage(tmp_path).model_cfg.head == "lm"  # a PPO workdir is a normal stage workdir


@pytest.mark.slow
def test_two_iterations_on_fsdp4_tensor2_match_one_device(sft_dir, rm_dir, tmp_path, monkeypatch):
    from instructjax import sharding

    real_make_mesh = sharding.make_mesh

    def run(shape):
        if shape == (1, 1, 1):
            monkeypatch.setattr(sharding, "make_mesh", lambda s: real_make_mesh(s, devices=jax.devices()[:1]))
        config = ppo_config(sft_dir, rm_dir, preset="tiny_ptx", num_iterations=2, mesh_shape=shape)
        train_ppo.train(config, tmp_path / str(shape))
        monkeypatch.setattr(sharding, "make_mesh", real_make_mesh)
        keys = ("pg_loss", "value_loss", "ptx_loss", "rm_score")
        return [[r[k] for k in keys] for r in iteration_rows(tmp_path / str(shape))]

    one, sharded = run((1, 1, 1)), run((1, 4, 2))
    assert len(one) == 2
    np.testing.assert_allclose(sharded, one, atol=2e-5, rtol=0)


KILL_SCRIPT = """
import sys
from test_ppo import ppo_config
from instructjax import train_ppo
train_ppo.train(ppo_config(sys.argv[1], sys.argv[2], preset="tiny_ptx", num_iterations=20), sys.argv[3])
"""


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(sft_dir, rm_dir, tmp_path):
    config = ppo_config(sft_dir, rm_dir, preset="tiny_ptx", num_iterations=20)
    train_ppo.train(config, tmp_path / "straight")
    killed_at = kill_after_checkpoint(KILL_SCRIPT, [sft_dir, rm_dir, tmp_path / "killed"], tmp_path / "killed", 6)
    assert killed_at is not None and killed_at < 20, killed_at
    assert train_ppo.train(config, tmp_path / "killed")["step"] == 20
    straight, killed = (_final_state(config, tmp_path / d) for d in ("straight", "killed"))
    for a, b in zip(jax.tree.leaves(killed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = {d: iteration_rows(tmp_path / d) for d in ("straight", "killed")}
    assert [r["rm_score"] for r in rows["killed"]] == [r["rm_score"] for r in rows["straight"]]


def _final_state(config, workdir):
    """Every array of the final checkpoint: policy, value, both optimizer states, β, RNG."""
    import orbax.checkpoint as ocp

    step = checkpoint.final_step(workdir)
    with ocp.CheckpointManager(workdir.absolute() / "checkpoints") as manager:
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(), train=ocp.args.StandardRestore())
        )
    return restored["params"], restored["train"]


@pytest.mark.slow
def test_bad_ppo_config_errors(sft_dir, rm_dir, tmp_path):
    with pytest.raises(ValueError, match="policy_from .* are required"):
        train_ppo.train(ppo_config("", rm_dir), tmp_path / "a")
    with pytest.raises(ValueError, match=r"config.policy_from=\S+ must hold a policy \(head='lm'\)"):
        train_ppo.train(ppo_config(rm_dir, rm_dir), tmp_path / "b")
    with pytest.raises(ValueError, match="multiple of minibatch_size"):
        train_ppo.train(ppo_config(sft_dir, rm_dir, minibatch_size=24, batch_size=32), tmp_path / "c")
    with pytest.raises(ValueError, match="grad_accum_steps=3 must divide the 2 minibatches"):
        train_ppo.train(ppo_config(sft_dir, rm_dir, **{"optim.grad_accum_steps": 3}), tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        train_ppo.train(ppo_config(tmp_path / "nowhere", rm_dir), tmp_path / "d")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["minibatch_size"] == 24


@pytest.mark.slow
def test_k_samples_per_prompt_rollouts_share_their_prompts(sft_dir, rm_dir, tmp_path):
    from instructjax import ppo_session

    config = ppo_config(sft_dir, rm_dir, num_iterations=1, batch_size=32, samples_per_prompt=4)
    session = train_ppo.setup(config, tmp_path)
    metrics = ppo_session.step(session)
    assert metrics["finite"]
    episodes = ppo_session.rollout_samples(session)
    assert len(episodes) == config.batch_size  # 32 episodes: 8 prompts (one per batch shard) x 4 samples
    prompts = [e["prompt"] for e in episodes]
    groups = [prompts[i : i + 4] for i in range(0, 32, 4)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) > 1
    for bad, message in ((3, "must be >= 1 and divide config.batch_size=32"), (8, "batch_size / config.samples_per")):
        with pytest.raises(ValueError, match=message):
            train_ppo.setup(ppo_config(sft_dir, rm_dir, batch_size=32, samples_per_prompt=bad), tmp_path / f"b{bad}")

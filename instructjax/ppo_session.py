"""PPO one iteration at a time, for notebooks: the same set-up and iteration ``train_ppo.train`` runs.

    session = train_ppo.setup(config, workdir)          # models, data, jitted programs: once
    metrics = ppo_session.step(session)                  # one iteration: generate, score, update, β
    ppo_session.rollout_samples(session, 8)              # its episodes: text, score, KL, reward, advantage
    ppo_session.set_kl_coef(session, 0.1)                # β from the next iteration on
    ppo_session.set_reward(session, "rm - 0.05*instructjax.reward_fns:response_words")
    ppo_session.save(session)                            # a checkpoint train() resumes from

``step`` calls ``session.iteration``, built by ``train_ppo.make_iteration`` exactly as ``train`` builds the
step ``loop.run`` drives: there is no second implementation. ``session.evaluate(session.state.params)`` is
the validation ``train`` runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instructjax import checkpoint, reward_fns, sharding, train_ppo, workdir_lock


def step(session: train_ppo.Session) -> dict[str, Any]:
    """One PPO iteration (generate, score, update, β), exactly as ``train`` runs it; returns its metrics and
    keeps the rollout in ``session.last['rollout']``."""
    with sharding.use(session.opened.mesh, session.opened.rules):
        session.state, out = session.iteration(session.state)
    out = {"iteration": int(session.state.step), **out}
    session.history.append(out)
    return out


def set_kl_coef(session: train_ppo.Session, beta: float) -> None:
    """β from the next iteration on (with ``kl.mode='adaptive'`` the controller moves it again from there)."""
    if not beta >= 0:
        raise ValueError(f"beta={beta}: the KL coefficient must be >= 0")
    session.state = session.state.replace(kl_coef=jax.device_put(jnp.float32(beta), session.state.kl_coef.sharding))


def set_reward(session: train_ppo.Session, reward_spec: Any) -> reward_fns.Reward:
    """A new reward (a ``reward_fns`` spec) from the next iteration on, for training and evaluation alike."""
    session.data = dataclasses.replace(session.data, reward=train_ppo.parse_reward(reward_spec, session.data))
    mesh, rules = session.opened.mesh, session.opened.rules
    session.iteration = train_ppo.make_iteration(
        session.config,
        session.plan,
        session.data,
        session.programs,
        session.frozen,
        mesh,
        rules,
        session.time_split,
        session.last,
    )
    session.evaluate = train_ppo.make_evaluate(
        session.config, session.plan.policy_cfg, session.data, session.rm, mesh, rules
    )
    return session.data.reward


def rollout_samples(session: train_ppo.Session, n: int | None = None) -> list[dict[str, Any]]:
    """The last iteration's rollout, one dict per episode: prompt, response, stopped, the reward's score,
    the KL to the reference (nats, summed over the response), the summed KL-shaped reward, the first
    advantage and the response length."""
    ro = session.last.get("rollout")
    if ro is None:
        raise ValueError("no rollout yet: call step(session) first")
    tok, rows = session.data.tokenizer, []
    for i in range(len(ro.scores) if n is None else min(n, len(ro.scores))):
        m = np.asarray(ro.response_mask[i]) > 0
        text, stopped = tok.decode_response(np.asarray(ro.response[i]).tolist())
        kl = (np.asarray(ro.logprobs[i]) - np.asarray(ro.ref_logprobs[i]))[m]
        rows.append(
            {
                "prompt": tok.decode(np.asarray(ro.prompt[i]).tolist()),
                "response": text,
                "stopped": stopped,
                "score": float(ro.scores[i]),
                "kl": float(kl.sum()),
                "reward": float(np.asarray(ro.rewards[i])[m].sum()),
                "advantage": float(np.asarray(ro.advantages[i])[m][0]) if m.any() else 0.0,
                "length": int(m.sum()),
            }
        )
    return rows


def save(session: train_ppo.Session) -> int:
    """Write a checkpoint of the current state (and the data iterators) to the workdir; ``train`` on the same
    workdir and config resumes from it. Returns its step."""
    with workdir_lock.hold(session.opened.workdir):
        ckpt = checkpoint.Checkpointer(session.opened.workdir, keep=session.config.keep_checkpoints, async_save=False)
        meta = {"best": None, "best_step": None, "evals": [], "train_seconds": 0.0, "wall_seconds": 0.0}
        ckpt.save(session.state, session.data.iters, meta)
        ckpt.close()
    return int(session.state.step)

"""Paper Fig. 33 (E.6): the pretraining-mix coefficient γ of PPO-ptx against alignment tax and reward.

    python scripts/ablate.py --config=configs/ablations/ptx_coef.py --workdir=workdirs/ablations/ptx_coef

γ ∈ {0, 0.1, 1, 10} (0 = plain PPO; the tiny world's PPO-ptx default is 1, the paper's 27.8 broke the
tiny policy, docs/results.md), the tiny preset's β (0.3), 100 iterations of 64 episodes, 8 pretraining
rows per episode.
"""

from instructjax.configlib import sibling

common = sibling(__file__, "common")


def get_config(arg=None):
    del arg
    c = common.sweep_config("ptx_coef", "PPO-ptx: pretraining coefficient γ (paper Fig. 33)")
    c.points = tuple(f"ppo.ptx_coef={g}" for g in (0.0, 0.1, 1.0, 10.0))
    c.x, c.x_scale = "ppo.ptx_coef", "symlog"
    return c

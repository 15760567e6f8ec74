"""Paper Fig. 35 (E.6, E.11): the number of PPO-ptx episodes (the paper: 256k against 512k).

    python scripts/ablate.py --config=configs/ablations/episodes.py --workdir=workdirs/ablations/episodes

PPO-ptx (γ 1) for 3,200, 6,400 (the tiny default, 100 iterations) and 12,800 episodes: half, the
default and twice it, as the paper compared its 256k with 512k.
"""

from instructjax.configlib import sibling

common = sibling(__file__, "common")


def get_config(arg=None):
    del arg
    c = common.sweep_config("episodes", "PPO-ptx episodes (paper Fig. 35)")
    c.common = "ppo.ptx_coef=1.0"
    c.points = tuple(f"ppo.total_episodes={n}" for n in (3200, 6400, 12800))
    c.x, c.x_scale = "ppo.total_episodes", "log"
    return c

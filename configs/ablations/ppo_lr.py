"""Paper Fig. 38 (E.9): PPO's learning rate, with and without the pretraining mix.

    python scripts/ablate.py --config=configs/ablations/ppo_lr.py --workdir=workdirs/ablations/ppo_lr

LR ∈ {5e-5, 2e-4 (the tiny default), 8e-4} × γ ∈ {0, 1}: a 16× range, as the paper's 2.55e-6 to 2.55e-5
spans 10×.
"""

from instructjax.configlib import sibling

common = sibling(__file__, "common")


def get_config(arg=None):
    del arg
    c = common.sweep_config("ppo_lr", "PPO learning rate without and with ptx (paper Fig. 38)")
    c.points = tuple(f"ppo.optim.lr={lr},ppo.ptx_coef={g}" for g in (0.0, 1.0) for lr in (5e-5, 2e-4, 8e-4))
    c.x, c.x_scale, c.series = "ppo.optim.lr", "log", "ppo.ptx_coef"
    return c

"""Paper Figs. 34 and 36 (E.6, E.7): the KL coefficient β, without the pretraining mix and with it.

    python scripts/ablate.py --config=configs/ablations/kl_coef.py --workdir=workdirs/ablations/kl_coef

β ∈ {0, 0.02, 0.3, 1} × γ ∈ {0, 1}: none, the paper's, the tiny presets' and a larger one. The KL
reference is ppo_init (the paper's Fig. 34 also tried the pretrained model as the reference; §4.2 reports
similar results).
"""

from instructjax.configlib import sibling

common = sibling(__file__, "common")


def get_config(arg=None):
    del arg
    c = common.sweep_config("kl_coef", "KL coefficient β without and with ptx (paper Figs. 34, 36)")
    c.points = tuple(f"ppo.kl.init_coef={b},ppo.ptx_coef={g}" for g in (0.0, 1.0) for b in (0.0, 0.02, 0.3, 1.0))
    c.x, c.x_scale, c.series = "ppo.kl.init_coef", "symlog", "ppo.ptx_coef"
    return c

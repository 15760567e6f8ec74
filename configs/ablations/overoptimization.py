"""Gao et al. (2022) on the synthetic world: gold and proxy score against d = sqrt(KL) (docs/ablations.md).

    python scripts/ablate.py --config=configs/ablations/overoptimization.py \
        --workdir=workdirs/ablations/overoptimization

Three proxy RMs by comparison count (500, 1,000 and all 2,000 ranked prompts; the gold score is the
world's), each: best-of-n of ppo_init's samples (n = 1 … 64) and PPO from ppo_init against it, gold
and proxy measured relative to ppo_init. Fits R_bon = d(α - βd) and R_RL = d(α - β log d).
"""

from instructjax.configlib import sibling

common = sibling(__file__, "common")


def get_config(arg=None):
    del arg
    c = common.sweep_config("overoptimization", "Reward-model overoptimization (Gao et al. 2022)")
    c.steps = ("rm", "best_of_n", "ppo")
    c.points = tuple(f"rm.data.train_records={n}" for n in (500, 1000, 2000))
    c.figure = "overoptimization"
    c.labels = tuple((f"rm.data.train_records={n}", f"{n} comparisons") for n in (500, 1000, 2000))
    return c

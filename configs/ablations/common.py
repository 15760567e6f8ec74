"""What every sweep of ``configs/ablations/`` shares: ``sweep_config(name)`` (``instructjax/ablate.py``).

A sweep file sets ``points`` (overrides of the pipeline's ``rm`` and ``ppo`` configs, ``stage.key=value``
joined by commas), ``steps`` (what a point trains), and what its figure and table show.
"""

import pathlib

import ml_collections

from instructjax.configlib import load_module

pipeline = load_module(pathlib.Path(__file__).parent.parent / "pipeline.py")


def sweep_config(name: str, title: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.title = title
    c.pipeline = pipeline.get_config("default")  # upstream stages, and the rm / ppo configs points override
    c.upstream_dir = ""  # "" = <workdir>/upstream; sweeps given one upstream share it and their equal points
    c.steps = ("ppo",)  # what each point runs, of ablate.STEPS: rm, best_of_n, ppo
    c.points = ("",)  # one point per entry; "" = the pipeline's configs unchanged
    c.common = ""  # overrides applied to every point (and named in its directory)
    c.seeds = 3  # each point's stages run with seed + 0, 1, 2
    c.workers = 2  # processes running points side by side
    # the figure and table
    c.figure = "sweep"  # sweep (metrics against x), curves (RM validation over training), overoptimization
    c.x = ""  # the override on the x-axis (sweep)
    c.x_scale = ""  # '' (linear), 'log' or 'symlog' (a log axis that holds 0)
    c.series = ""  # an override whose values get a line each (sweep)
    c.metrics = ("gold_score", "rm_score", "alignment_tax", "kl_to_init")
    c.labels = ()  # (point label, legend text) pairs
    c.rl_window = 10  # overoptimization: PPO iterations averaged into one point of the RL curve
    # the evaluation of every PPO point (and of ppo_init, the reference)
    c.eval = ml_collections.ConfigDict()
    c.eval.prompts = 500  # test prompts, greedy, gold and RM score
    c.eval.kl_prompts = 200  # test prompts whose samples estimate the KL to ppo_init
    c.eval.max_new_tokens = 16
    c.eval.batch_size = 250
    c.eval.bon_prompts = 200  # best_of_n: test prompts, 64 samples each at temperature 1
    c.eval.bon_ns = (1, 2, 4, 8, 16, 32, 64)
    return c

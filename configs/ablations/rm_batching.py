"""Paper §3.5: the RM with all C(K,2) pairs of a prompt in one batch element, against shuffled pairs.

    python scripts/ablate.py --config=configs/ablations/rm_batching.py --workdir=workdirs/ablations/rm_batching

One epoch of the 2,000 ranked prompts (34,166 pairs; the paper's single epoch), and two, from the
upstream SFT model, validated every 10 steps on the grouped log loss and accuracy. Shuffled pairs use 272
pairs per step, so that both take about 125 steps an epoch and see as many comparisons per step (the
grouped batch: 16 prompts, 273 pairs on average).
"""

from instructjax.configlib import sibling

common = sibling(__file__, "common")


def get_config(arg=None):
    del arg
    c = common.sweep_config("rm_batching", "RM: K-way groups against shuffled pairs (paper §3.5)")
    c.steps = ("rm",)
    c.common = "rm.eval_every=10"
    grouped, pairs = "rm.data.pairs_as_examples=False", "rm.data.pairs_as_examples=True,rm.batch_size=272"
    c.points = (grouped, pairs, f"{grouped},rm.num_epochs=2.0", f"{pairs},rm.num_epochs=2.0")
    c.figure = "curves"
    c.metrics = ("val_loss", "val_accuracy", "val_gold_accuracy")
    c.labels = (
        ("rm.eval_every=10", "grouped: K completions per element"),
        ("rm.batch_size=272,rm.data.pairs_as_examples=True,rm.eval_every=10", "shuffled pairs"),
        ("rm.eval_every=10,rm.num_epochs=2.0", "grouped, 2 epochs"),
        (
            "rm.batch_size=272,rm.data.pairs_as_examples=True,rm.eval_every=10,rm.num_epochs=2.0",
            "shuffled pairs, 2 epochs",
        ),
    )
    return c

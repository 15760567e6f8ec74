"""Compare any set of trained (or imported) policies against a baseline on held-out prompts.

    python scripts/evaluate.py --model=sft=workdirs/default/sft --model=ppo_ptx=workdirs/default/ppo_ptx \
        --rm=workdirs/default/rm --prompts_file=workdirs/default/world/prompts_test.jsonl \
        --pretrain_file=workdirs/default/world/pretrain_heldout.jsonl --baseline=sft

Prints ``evaluate.compare_models`` (without the per-prompt samples) as JSON: gold score, win rates
against the baseline under the gold score and the RM, RM score, KL to the baseline with its standard error,
held-out pretraining NLL. The gold score needs the synthetic world's prompts: pass ``--nogold`` for any
other prompts.

The defaults are the pipeline's (``configs/pipeline.py``'s ``eval`` section: prompts, KL prompts, response
length, batch size), so a model measured here and in the pipeline's report gets the same numbers; the KL,
estimated from one sample per prompt, moves with the batch size and the seed, and its standard error says by
how much. ``--best=NAME`` evaluates that model at its selected checkpoint, as the pipeline does ``ppo_init``.
"""

import json
import pathlib

from absl import app, flags, logging

from instructjax import configlib, evaluate, reward

# The pipeline's evaluation settings: the defaults below, so both measure a model the same way.
PIPELINE_EVAL = configlib.load_config(str(pathlib.Path(__file__).parents[1] / "configs" / "pipeline.py")).eval

_MODELS = flags.DEFINE_multi_string("model", [], "NAME=WORKDIR of a policy (repeatable)")
_BASELINE = flags.DEFINE_string("baseline", "sft", "the NAME every model is compared with")
_RM = flags.DEFINE_string("rm", None, "the reward model's workdir", required=True)
_PROMPTS = flags.DEFINE_string("prompts_file", None, "jsonl with a 'prompt' per line", required=True)
_PRETRAIN = flags.DEFINE_string("pretrain_file", None, "held-out pretraining jsonl", required=True)
_N = flags.DEFINE_integer("prompts", PIPELINE_EVAL.prompts, "prompts used (the first N)")
_KL_PROMPTS = flags.DEFINE_integer("kl_prompts", PIPELINE_EVAL.kl_prompts, "prompts whose samples estimate the KL")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", PIPELINE_EVAL.max_new_tokens, "response length limit")
_BATCH = flags.DEFINE_integer("batch_size", PIPELINE_EVAL.batch_size, "prompts per sampling batch")
_BEST = flags.DEFINE_multi_string("best", [], "NAME of a model evaluated at its best checkpoint (repeatable)")
_GOLD = flags.DEFINE_bool("gold", True, "score with the synthetic world's gold score (its prompts only)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    workdirs = {}
    for spec in _MODELS.value:
        if "=" not in spec:
            raise app.UsageError(f"--model={spec!r}: expected NAME=WORKDIR")
        name, workdir = spec.split("=", 1)
        workdirs[name] = workdir
    with open(_PROMPTS.value) as f:
        prompts = [json.loads(line)["prompt"] for line in f][: _N.value]
    models = evaluate.compare_models(
        workdirs,
        baseline=_BASELINE.value,
        rm=reward.load_reward_model(_RM.value),
        prompts=prompts,
        pretrain_file=_PRETRAIN.value,
        kl_prompts=_KL_PROMPTS.value,
        max_new_tokens=_MAX_NEW.value,
        batch_size=_BATCH.value,
        gold=_GOLD.value,
        best=_BEST.value,
    )
    print(json.dumps({n: {k: v for k, v in r.items() if k != "samples"} for n, r in models.items()}, indent=1))


if __name__ == "__main__":
    app.run(main)

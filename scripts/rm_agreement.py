"""Does the reward model order the policy's own samples as the gold score does? (What PPO needs of it.)

    python scripts/rm_agreement.py --policy=workdirs/default/sft --rm=workdirs/default/rm \
        --prompts_file=workdirs/default/world/prompts_valid.jsonl

Prints ``evaluate.rm_agreement`` as JSON: the share of same-prompt sample pairs (gold gap > 0.2) that the
RM orders like the gold score, overall and per task family; 0.5 is chance.
"""

import json

from absl import app, flags, logging

from instructjax import evaluate, reward
from instructjax.stage import load_stage

_POLICY = flags.DEFINE_string("policy", None, "the policy stage's workdir", required=True)
_RM = flags.DEFINE_string("rm", None, "the reward model's workdir", required=True)
_PROMPTS = flags.DEFINE_string("prompts_file", None, "jsonl with a 'prompt' per line", required=True)
_N = flags.DEFINE_integer("prompts", 200, "prompts used (the first N)")
_SAMPLES = flags.DEFINE_integer("samples", 8, "samples per prompt")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    with open(_PROMPTS.value) as f:
        prompts = [json.loads(line)["prompt"] for line in f][: _N.value]
    rm = reward.load_reward_model(_RM.value)
    policy = load_stage(_POLICY.value, best=True)
    result = evaluate.rm_agreement(rm, policy, prompts, _SAMPLES.value, seed=_SEED.value)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)

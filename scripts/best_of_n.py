"""Best-of-n with the reward model: the gold score of the RM's pick of n samples, and of the gold-best pick.

    python scripts/best_of_n.py --policy=workdirs/default/sft --rm=workdirs/default/rm

Prompts default to the policy's world's ``prompts_test.jsonl`` (the first ``--prompts``). The synthetic world
only: the gold score is the point. Prints a table and a JSON list (``reward.best_of_n``).
"""

import json
import pathlib

from absl import app, flags, logging

from instructjax import reward
from instructjax.data import world_tasks
from instructjax.stage import load_stage

_POLICY = flags.DEFINE_string("policy", None, "the policy stage's workdir", required=True)
_RM = flags.DEFINE_string("rm", None, "the reward model's workdir", required=True)
_PROMPTS = flags.DEFINE_integer("prompts", 200, "test prompts used")
_NS = flags.DEFINE_list("n", ["1", "2", "4", "8", "16", "32"], "the n of best-of-n")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    policy = load_stage(_POLICY.value, best=True)
    rm = reward.load_reward_model(_RM.value)
    test = pathlib.Path(policy.config.data.world_dir) / "prompts_test.jsonl"
    prompts = [json.loads(line)["prompt"] for line in test.read_text().splitlines()][: _PROMPTS.value]
    rows = reward.best_of_n(rm, policy, prompts, world_tasks.gold_score, [int(n) for n in _NS.value], seed=_SEED.value)
    print("   n  KL_bon  gold(RM pick)  gold(oracle pick)")
    for r in rows:
        print(f"{r['n']:4d}  {r['kl']:6.2f}  {r['rm_pick_gold']:13.3f}  {r['oracle_gold']:17.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    app.run(main)

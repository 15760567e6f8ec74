"""Collect comparisons of a policy's own samples, ranked by the synthetic world's simulated labelers.

    python scripts/label_samples.py --policy=workdirs/default/sft \
        --prompts_file=workdirs/default/world/comparisons_train.jsonl --out=/tmp/world2/comparisons_train.jsonl

The paper's labelers ranked outputs of its models; this writes such a ``comparisons`` jsonl (K = 4..9
samples per prompt) for ``scripts/train_rm.py``. ``--labeler_temperature=0`` gives noise-free labelers.
``--mix_with=COMPARISONS.jsonl`` ranks the policy's samples together with the first ``--mix_keep``
completions that file has for the same prompt (K at most 9 in all), as the paper's rankings mixed
several policies' outputs:

    python scripts/label_samples.py --policy=workdirs/default/ppo_ptx \
        --prompts_file=workdirs/default/world/comparisons_train.jsonl \
        --mix_with=workdirs/default/world/comparisons_train.jsonl --out=/tmp/mixed.jsonl
"""

import json

from absl import app, flags, logging

from instructjax import evaluate
from instructjax.data import formats
from instructjax.stage import load_stage

_POLICY = flags.DEFINE_string("policy", None, "the policy stage's workdir", required=True)
_PROMPTS = flags.DEFINE_string("prompts_file", None, "jsonl with a 'prompt' per line", required=True)
_OUT = flags.DEFINE_string("out", None, "comparisons jsonl to write", required=True)
_TEMPERATURE = flags.DEFINE_float("labeler_temperature", None, "labeler noise (default: the world's)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling and labeling seed")
_MIX_WITH = flags.DEFINE_string("mix_with", None, "comparisons jsonl whose completions join each prompt's row")
_MIX_KEEP = flags.DEFINE_integer("mix_keep", 5, "completions per prompt taken from --mix_with")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    with open(_PROMPTS.value) as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    policy = load_stage(_POLICY.value, best=True)
    mix_with = None
    if _MIX_WITH.value:
        mix_with = {}
        for row in formats.read_jsonl(_MIX_WITH.value, "comparisons")[0]:
            mix_with.setdefault(row["prompt"], row["completions"])
    rows = evaluate.label_policy_samples(
        policy,
        prompts,
        labeler_temperature=_TEMPERATURE.value,
        seed=_SEED.value,
        mix_with=mix_with,
        mix_keep=_MIX_KEEP.value,
    )
    print(f"{formats.write_jsonl(_OUT.value, rows)} comparisons of {len(prompts)} prompts -> {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

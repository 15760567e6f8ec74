"""Stage 3: PPO or PPO-ptx. Rerunning the same command resumes.

    python scripts/pipeline.py --workdir=/tmp/run   # world, base, sft, rm, ppo_init
    python scripts/train_ppo.py --config=configs/ppo.py:tiny_ptx --workdir=/tmp/run/ppo_ptx \
        --config.policy_from=/tmp/run/ppo_init --config.rm_from=/tmp/run/rm
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from instructjax import loop, sharding, train_ppo

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ppo.py:tiny", "stage config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "stage directory (checkpoints, metrics, config.json)", required=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    sharding.initialize_distributed()  # multi-host (docs/tpu.md, docs/gpu.md); a no-op on one host
    summary = train_ppo.train(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(summary, indent=1))
    if summary["status"] == "preempted":  # saved; a scheduler sees "try again", not "finished"
        sys.exit(loop.EXIT_PREEMPTED)


if __name__ == "__main__":
    app.run(main)

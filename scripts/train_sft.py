"""Stage 0/1: pretraining or supervised fine-tuning. Rerunning the same command resumes.

    python scripts/make_synthetic_data.py --out=/tmp/world
    python scripts/train_sft.py --config=configs/sft.py:base --workdir=/tmp/run/base --config.data.world_dir=/tmp/world
    python scripts/train_sft.py --config=configs/sft.py:tiny --workdir=/tmp/run/sft --config.data.world_dir=/tmp/world \
        --config.init_from=/tmp/run/base
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from instructjax import loop, sharding, train_sft

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sft.py:tiny", "stage config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "stage directory (checkpoints, metrics, config.json)", required=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    sharding.initialize_distributed()  # multi-host (docs/tpu.md, docs/gpu.md); a no-op on one host
    summary = train_sft.train(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(summary, indent=1))
    if summary["status"] == "preempted":  # saved; a scheduler sees "try again", not "finished"
        sys.exit(loop.EXIT_PREEMPTED)


if __name__ == "__main__":
    app.run(main)

"""The default job: synthetic world -> base model -> SFT and PPO-init SFT -> evaluation and report.

    python scripts/pipeline.py --workdir=workdirs/default
    python scripts/pipeline.py --workdir=/tmp/quick --config=configs/pipeline.py:quick

Rerunning the same command skips finished stages and resumes an interrupted one.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from instructjax import stages

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pipeline.py:default", "pipeline config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "where every stage and the report go")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    results = stages.run(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(results, indent=1))
    print(f"report: {_WORKDIR.value}/report.md")


if __name__ == "__main__":
    app.run(main)

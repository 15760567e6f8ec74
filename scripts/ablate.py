"""Run one of the paper's ablations on the synthetic world: every point, several seeds, a figure and a table.

    python scripts/ablate.py --config=configs/ablations/kl_coef.py --workdir=workdirs/ablations/kl_coef
    python scripts/ablate.py --config=configs/ablations/ptx_coef.py --workdir=workdirs/ablations/ptx_coef \
        --config.upstream_dir=workdirs/ablations/upstream   # share upstream stages and equal points

Rerunning skips finished points and resumes an interrupted one. Sweeps: configs/ablations/; results:
docs/ablations.md.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from instructjax import ablate, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "a sweep in configs/ablations/", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where the sweep's table and figure go", required=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        summary = ablate.run(_CONFIG.value, _WORKDIR.value)
    except loop.Preempted as stopped:
        print(f"[ablate] {stopped}: rerun the same command to resume", flush=True)
        sys.exit(loop.EXIT_PREEMPTED)
    print(json.dumps({p["label"]: p["seeds"] for p in summary["points"]}))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)

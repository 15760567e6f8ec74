"""The default job: synthetic world -> base model -> SFT -> RM -> PPO-init SFT -> PPO and PPO-ptx -> evaluation.

    python scripts/pipeline.py --workdir=workdirs/default
    python scripts/pipeline.py --workdir=/tmp/quick --config=configs/pipeline.py:quick

Rerunning the same command skips finished stages and resumes an interrupted one. Prints the results table and
where everything landed; exits with status 75 (``loop.EXIT_PREEMPTED``) when SIGTERM stopped a stage.
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from instructjax import loop, sharding, stages

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pipeline.py:default", "pipeline config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "where every stage and the report go")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    sharding.set_tpu_flags()  # the TPU compiler's flags, before any JAX call (a no-op off TPU)
    try:
        results = stages.run(_CONFIG.value, _WORKDIR.value)
    except loop.Preempted as stopped:
        print(f"[pipeline] {stopped}: rerun the same command to resume", flush=True)
        sys.exit(loop.EXIT_PREEMPTED)
    workdir = pathlib.Path(_WORKDIR.value)
    print("\n".join(["", *stages.results_table(results), ""]))
    print(f"report:   {workdir / 'report.md'} (samples, the reward model, times, curves)")
    print(f"results:  {workdir / 'results.json'}")
    print(f"stages:   {', '.join(str(workdir / name) for name, _ in stages.STAGES)}")
    print(f"watch:    tensorboard --logdir={workdir} (pip install tensorboard)")


if __name__ == "__main__":
    app.run(main)

"""Compile a stage's programs ahead of time for a TPU slice, on a machine without a TPU (needs libtpu:
``pip install -e '.[tpu]'``), and print the per-chip memory plan against HBM and the FLOPs; a JSON line last.

    python scripts/aot_compile.py --config=configs/tpu.py:sft_1p3b --topology=v5e:4x4
    python scripts/aot_compile.py --config=configs/tpu.py:ppo_ptx_1p3b --topology=v5e:8x8 --what=rollout
    python scripts/aot_compile.py --config=configs/tpu.py:ppo_ptx_1p3b --config.aot.policy_model.remat=none
    python scripts/aot_compile.py --config=configs/tpu.py:ppo_ptx_1p3b --what=rollout --config.decode_layout=train

Besides memory, the table has each program's collective bytes (the decode loop's per step) and a PREDICTED time
per chip (``aot_compiler.predict``); ``--hlo_dir`` keeps the compiled HLO text for ``hlo_stats``.

``--topology`` defaults to the preset's ``tpu_slice``. docs/scaling.md has the measured table.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # nothing runs here: the TPU is only a compilation target

from absl import app, flags
from ml_collections import config_flags

from instructjax import aot, aot_compiler

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tpu.py:sft_1p3b", "stage config", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU slice, e.g. v5e:4x4 or v5p:2x2x1 ('' = the preset's tpu_slice)")
_WHAT = flags.DEFINE_enum("what", "all", aot.WHAT, "train_step, eval_step (SFT, RM), rollout (PPO), all")
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "write each compiled program's HLO text here (for hlo_stats)")


def main(argv):
    del argv
    config = _CONFIG.value
    topology = _TOPOLOGY.value or config.get("tpu_slice", "")
    if not topology:
        raise app.UsageError("--topology is required (this config names no tpu_slice)")
    aot_compiler.HLO_DIR = _HLO_DIR.value or None
    aot.run(config, topology, _WHAT.value, label=config_flags.get_config_filename(flags.FLAGS["config"]))


if __name__ == "__main__":
    app.run(main)

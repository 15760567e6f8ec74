"""List a config file's presets and every key of one preset, with its value and the config file's comment.

    python scripts/config_info.py --config=configs/sft.py             # the presets, then the default's keys
    python scripts/config_info.py --config=configs/tpu.py:rm_6p7b     # one preset: its tpu_slice, mesh, batch
    python scripts/config_info.py --config=configs/ablations/kl_coef.py

Every key printed can be overridden as --config.KEY=VALUE on a script that takes the file, e.g.
``python scripts/train_sft.py --config=configs/sft.py:tiny --config.optim.lr=3e-4``.
"""

import signal
import sys

from absl import app, flags

from instructjax import configlib

_CONFIG = flags.DEFINE_string("config", None, "a config file and optional preset: path/to/config.py[:preset]")
flags.mark_flag_as_required("config")


def main(argv):
    del argv
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quietly stop when piped to head
    try:
        lines = configlib.describe(_CONFIG.value)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"config_info: {error}")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)

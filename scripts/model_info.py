"""Print a model preset's size and sharding plan; optionally init it sharded and time a forward pass.

python scripts/model_info.py --config=configs/model.py:tiny
python scripts/model_info.py --config=configs/model.py:llama3_8b --config.mesh_shape="(1,-1,1)" --run=false
"""

import json

from absl import app, flags
from ml_collections import config_flags

from instructjax import model_info

_CONFIG = config_flags.DEFINE_config_file("config", "configs/model.py:tiny", "model config file", lock_config=True)
_RUN = flags.DEFINE_bool("run", True, "also init the params sharded and time a jitted forward pass")
_TABLE = flags.DEFINE_bool("table", True, "print the per-parameter sharding table")


def main(argv):
    del argv
    report = model_info.report(_CONFIG.value, run=_RUN.value)
    if not _TABLE.value:
        report.pop("table")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)

"""Write the synthetic instruction world (jsonl files, tokenizer.json, world.json) to a directory.

    python scripts/make_synthetic_data.py --out=/tmp/world --seed=0
    python scripts/make_synthetic_data.py --out=/tmp/world_small --pretrain_train=2000 --demos_train=500

See docs/data.md for what each file holds and how the world is built.
"""

import dataclasses
import json

from absl import app, flags

from instructjax.data import world

_OUT = flags.DEFINE_string("out", None, "output directory", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "world seed: the same seed writes the same bytes")
# One integer flag per WorldSizes field (rows per file, k_min/k_max), defaulting to the library defaults.
_SIZES = {
    f.name: flags.DEFINE_integer(f.name, f.default, f"WorldSizes.{f.name}")
    for f in dataclasses.fields(world.WorldSizes)
}


def main(argv):
    del argv
    sizes = world.WorldSizes(**{name: flag.value for name, flag in _SIZES.items()})
    print(json.dumps(world.write_world(_OUT.value, _SEED.value, sizes), indent=1))


if __name__ == "__main__":
    app.run(main)

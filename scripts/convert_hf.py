"""Convert between Hugging Face model directories and instructjax stage workdirs (see docs/hf.md).

    # HF (config.json + *.safetensors) -> a workdir that init_from / evaluate.load_stage / sample.py read
    python scripts/convert_hf.py --to=instructjax --hf_dir=/models/Llama-3-8B --workdir=/tmp/llama3 \\
        --scan_layers --pad_vocab_to_multiple=8 --mesh_shape="(1,-1,1)"
    # a workdir (latest checkpoint, or --best) -> a directory transformers loads
    python scripts/convert_hf.py --to=hf --workdir=/tmp/run/sft --hf_dir=/tmp/sft_hf
    # a reward model: sequence classification with one label; the normalisation bias of the RM stage
    # (rm workdir/reward_bias.json, computed for its best checkpoint) is subtracted
    python scripts/convert_hf.py --to=hf --workdir=/tmp/run/rm --hf_dir=/tmp/rm_hf --best

Both directions show a progress bar over tensors.
"""

from absl import app, flags, logging

from instructjax import hf

_TO = flags.DEFINE_enum("to", None, ["instructjax", "hf"], "conversion direction", required=True)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "the Hugging Face model directory (read, or written)", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the instructjax stage workdir (written, or read)", required=True)
_MESH = flags.DEFINE_string("mesh_shape", "(1,-1,1)", "(data, fsdp, tensor) to load on; -1 fills")
_PAD_VOCAB = flags.DEFINE_integer("pad_vocab_to_multiple", 1, "to instructjax: round the vocabulary up (zero rows)")
_MIN_VOCAB = flags.DEFINE_integer(
    "min_vocab_size", None, "to instructjax: at least this many rows (default: the tokenizer's vocab_size)"
)
_SCAN = flags.DEFINE_bool("scan_layers", False, "to instructjax: stacked layers (lax.scan; large models)")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "to instructjax: storage dtype of the params")
_COMPUTE_DTYPE = flags.DEFINE_string("compute_dtype", "float32", "to instructjax: model.dtype in config.json")
_BEST = flags.DEFINE_bool("best", False, "to hf: the best evaluation's params instead of the latest")
_STEP = flags.DEFINE_integer("step", None, "to hf: this checkpoint step instead of the latest")
_REWARD_BIAS = flags.DEFINE_float(
    "reward_bias", None, "to hf, reward model: subtracted from rewards (default: <workdir>/reward_bias.json, else 0)"
)
_MODEL_TYPE = flags.DEFINE_enum("model_type", None, list(hf.FAMILIES), "to hf: family to write (default: inferred)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "to hf: tensor dtype")
_SHARD = flags.DEFINE_integer("max_shard_size_mb", 4096, "to hf: split the safetensors above this size (MiB)")


def _mesh_shape(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.strip("()[] ").split(",") if s.strip())


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _TO.value == "instructjax":
        config = hf.import_to_workdir(
            _HF_DIR.value,
            _WORKDIR.value,
            mesh_shape=_mesh_shape(_MESH.value),
            pad_vocab_to_multiple=_PAD_VOCAB.value,
            min_vocab_size=_MIN_VOCAB.value,
            scan_layers=_SCAN.value,
            dtype=_COMPUTE_DTYPE.value,
            param_dtype=_PARAM_DTYPE.value,
            progress=True,
        )
        print(f"{config['hf']['architecture']} -> {_WORKDIR.value} (model: {config['model']})")
    else:
        out = hf.export_workdir(
            _WORKDIR.value,
            _HF_DIR.value,
            best=_BEST.value,
            step=_STEP.value,
            reward_bias=_REWARD_BIAS.value,
            model_type=_MODEL_TYPE.value,
            dtype=_DTYPE.value,
            max_shard_size=_SHARD.value << 20,
            mesh_shape=_mesh_shape(_MESH.value),
            progress=True,
        )
        print(f"{_WORKDIR.value} -> {out}")


if __name__ == "__main__":
    app.run(main)

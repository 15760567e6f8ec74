"""Sample from a trained stage (or an untrained model) on prompts from the command line or a file.

    python scripts/sample.py --workdir=/tmp/run/sft --prompt="sort 5 2 9 =>" --prompt="add 12 7 =>"
    python scripts/sample.py --workdir=/tmp/run/sft --prompts_file=/tmp/world/prompts_test.jsonl --limit=10
    python scripts/sample.py --workdir=/tmp/run/sft --prompt="reverse cat dog =>" --temperature=1.0 --top_p=0.9

A prompts file is jsonl with a "prompt" field per line, or plain text with one prompt per line.
A Hugging Face checkpoint converted with ``scripts/convert_hf.py --to=instructjax`` is a workdir too.
"""

import json
import pathlib

from absl import app, flags, logging

from instructjax.stage import load_stage, sample_texts

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage's workdir (config.json + checkpoints)", required=True)
_BEST = flags.DEFINE_bool("best", False, "load the best evaluation's params instead of the latest")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt (repeatable)")
_FILE = flags.DEFINE_string("prompts_file", None, "jsonl with a 'prompt' field, or one prompt per line")
_LIMIT = flags.DEFINE_integer("limit", 0, "use only the first N prompts of the file (0 = all)")
_NEW = flags.DEFINE_integer("max_new_tokens", 16, "tokens to generate at most")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 = off")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


def read_prompts(path: str) -> list[str]:
    lines = [line for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line)["prompt"] if line.lstrip().startswith("{") else line for line in lines]


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    prompts = list(_PROMPT.value) + (read_prompts(_FILE.value) if _FILE.value else [])
    prompts = prompts[: _LIMIT.value] if _LIMIT.value else prompts
    if not prompts:
        raise app.UsageError("give --prompt or --prompts_file")
    stage = load_stage(_WORKDIR.value, best=_BEST.value)
    responses = sample_texts(
        stage,
        prompts,
        max_new_tokens=_NEW.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        seed=_SEED.value,
    )
    for prompt, (text, stopped) in zip(prompts, responses, strict=True):
        print(f"{prompt}  ->  {text}{'' if stopped else '  [no EOS]'}")


if __name__ == "__main__":
    app.run(main)

"""A public preference dataset -> the nine jsonl files the pipeline reads (docs/data.md, section 4).

    python scripts/prepare_data.py --source=hh --input=/data/hh-rlhf --out=/data/hh --tokenizer=/models/pythia-1b
    python scripts/prepare_data.py --source=tldr --input=/data/tldr_comparisons \\
        --sft_input=/data/tldr_sft --out=/data/tldr --tokenizer=/models/pythia-1b --recipe=configs/recipes/tldr.py
    python scripts/prepare_data.py --source=ultrafeedback --input=/data/UltraFeedback --out=/data/uf \\
        --rating=aspects --tokenizer=/models/Qwen2.5-0.5B-Instruct --skip_bad
    python scripts/prepare_data.py --source=conversational --input=/data/prefs --out=/data/prefs_jsonl \\
        --splits=train:train_prefs,test:test_prefs --tokenizer=/models/Qwen2.5-0.5B-Instruct

``--input`` is a jsonl, json or parquet file, a directory of them (split = file name up to its first ``-``
or ``.``), or a directory written by ``datasets``' ``save_to_disk``. Prints rows per file, skips by reason,
token-length percentiles under ``--tokenizer`` and how many rows the maximum lengths would truncate
(``--max_len``/``--max_prompt_len``, or those of ``--recipe``); writes the same to ``<out>/prepare_report.json``.
"""

import json

from absl import app, flags

from instructjax import configlib
from instructjax.data import prepare, public

_SOURCE = flags.DEFINE_enum("source", None, list(public.SOURCES), "the dataset's schema", required=True)
_INPUT = flags.DEFINE_string("input", None, "a dataset file, a directory of them, or save_to_disk's", required=True)
_OUT = flags.DEFINE_string("out", None, "where the nine jsonl files go", required=True)
_SFT_INPUT = flags.DEFINE_string("sft_input", None, "tldr: the TL;DR SFT split (post/summary records)")
_PRETRAIN = flags.DEFINE_string("pretrain", None, "a jsonl of {'text'} rows for PPO-ptx (default: the dataset's)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "the model's tokenizer directory: chat template and lengths")
_TEMPLATE = flags.DEFINE_string("chat_template", "auto", "'auto' (the tokenizer's), 'none', or a jinja file")
_RATING = flags.DEFINE_enum("rating", "overall", list(public.RATINGS), "ultrafeedback: which rating ranks")
_SPLITS = flags.DEFINE_string("splits", "", "role:split pairs, e.g. train:train_prefs,test:test_prefs")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the carved splits")
_VALID = flags.DEFINE_float("valid_fraction", 0.05, "of train, carved as valid when the dataset has no valid split")
_TEST = flags.DEFINE_float("test_fraction", 0.05, "of train, carved as test when the dataset has no test split")
_SKIP_BAD = flags.DEFINE_bool("skip_bad", False, "skip (and count) malformed records instead of failing")
_RECIPE = flags.DEFINE_string("recipe", None, "a pipeline config (path[:preset]) whose max lengths to check")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "SFT/RM tokens per sequence to check (overrides --recipe's)")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_len", 0, "PPO prompt tokens to check (overrides --recipe's)")


def _max_lengths() -> tuple[int, int]:
    max_len, max_prompt_len = 0, 0
    if _RECIPE.value:
        config = configlib.load_config(_RECIPE.value)
        max_len = max(config.sft.data.max_len, config.rm.data.max_len)
        max_prompt_len = config.ppo.data.max_prompt_len
    return _MAX_LEN.value or max_len, _MAX_PROMPT.value or max_prompt_len


def main(argv):
    del argv
    splits = dict(pair.split(":", 1) for pair in _SPLITS.value.split(",")) if _SPLITS.value else None
    max_len, max_prompt_len = _max_lengths()
    report = prepare.prepare(
        _SOURCE.value,
        _INPUT.value,
        _OUT.value,
        sft_input=_SFT_INPUT.value,
        pretrain=_PRETRAIN.value,
        tokenizer=_TOKENIZER.value,
        template=_TEMPLATE.value,
        rating=_RATING.value,
        splits=splits,
        seed=_SEED.value,
        valid_fraction=_VALID.value,
        test_fraction=_TEST.value,
        skip_bad=_SKIP_BAD.value,
        max_len=max_len,
        max_prompt_len=max_prompt_len,
    )
    print(f"template: {report['template']}")
    print("rows: " + ", ".join(f"{name} {n}" for name, n in report["rows"].items()))
    print(f"skipped: {report['skipped'] or 'none'}; duplicates written once: {report['duplicates'] or 'none'}")
    for message in report["skip_examples"]:
        print(f"  {message}")
    if report["tokens"]:
        for name, p in report["tokens"]["lengths"].items():
            print(f"tokens {name}: " + ", ".join(f"{k} {v}" for k, v in p.items()))
        t = report["tokens"]
        print(f"truncated at max_len={t['max_len']}, max_prompt_len={t['max_prompt_len']}: {t['truncated']}")
    print(json.dumps({"out": _OUT.value, "rows": report["rows"], "skipped": report["skipped"]}))


if __name__ == "__main__":
    app.run(main)

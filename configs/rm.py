"""Stage 2, the reward model: ``instructjax/train_rm.py``.

    python scripts/train_rm.py --config=configs/rm.py:tiny --workdir=/tmp/run/rm \
        --config.data.world_dir=/tmp/world --config.init_from=/tmp/run/sft

Presets:
- ``tiny``: the tiny model on the synthetic world's comparisons, initialised from its SFT model.
- ``tiny_pairs``: the same with the §3.5 ablation: every comparison pair its own example, shuffled.
- ``paper_6b``: the paper's RM (App. C.2) on the GPT-3 6.7B shape: 1 epoch, LR 9e-6 cosine to 10%,
  batch 64 prompts (up to 64·C(9,2) = 2,304 comparisons).
"""

import ml_collections

from instructjax.configlib import sibling

model_presets = sibling(__file__, "model")

PRESETS = ("tiny", "tiny_pairs", "paper_6b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.stage = "rm"  # informational: which trainer this config is for
    c.model = model_presets.model_config("tiny")  # must match the SFT model it starts from
    c.model.head = "scalar"  # the unembedding replaced by a scalar projection (§3.5, App. C)
    c.model.dropout_rate = 0.0  # the paper states none for the RM

    c.data = ml_collections.ConfigDict()
    c.data.world_dir = ""  # directory of the jsonl files
    c.data.tokenizer = ""  # "" = <world_dir>/tokenizer.json
    c.data.cache_dir = ""  # "" = <world_dir>/tfds
    c.data.train_file = "comparisons_train.jsonl"  # K-way rankings (instructjax/data/formats.py)
    c.data.valid_file = "comparisons_valid.jsonl"
    c.data.demos_file = "demos_train.jsonl"  # the SFT demonstrations whose mean reward becomes the bias (§3.5)
    c.data.max_len = 32  # prompt + completion + EOS tokens
    c.data.max_prompt_len = 16
    c.data.prompt_template = "{prompt}"  # must match the policy's
    c.data.k_max = 9  # completions per batch element (the paper's K is 4..9); fewer are masked
    c.data.train_records = 0  # the first N rankings of train_file only (Gao et al.'s comparison counts); 0 = all
    c.data.pairs_as_examples = False  # the §3.5 ablation: each pair its own example, shuffled across the data
    # Packed training batches: as many whole prompts as fit in R rows (about R / mean K; batch_size unused)
    c.data.pack_rows = 0  # 0: padded to k_max completions; R > 0: R completion rows a batch (docs/reward_model.md)
    c.data.skip_bad = False

    c.batch_size = 64  # prompts per step (the paper: 64), or pairs with pairs_as_examples
    c.eval_batch_size = 64
    c.num_epochs = 1.0  # the paper: 1 epoch; more overfits quickly
    c.num_steps = 0  # if > 0, overrides num_epochs

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3  # tiny model; the paper's 6B: 9e-6
    c.optim.warmup_steps = 0
    c.optim.final_lr_fraction = 0.1  # cosine to 10% (paper)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.grad_accum_steps = 1

    c.init_from = ""  # the SFT workdir (its latest params); "" = random init
    c.mesh_shape = (1, -1, 1)
    c.rules = [list(r) for r in model_presets.DEFAULT_RULES]
    c.logging = ml_collections.ConfigDict()  # metrics.jsonl and TensorBoard always; Weights & Biases if asked
    c.logging.wandb = False  # needs `pip install wandb`; off by default
    c.logging.wandb_project = "instructjax"
    c.logging.wandb_mode = ""  # '' = wandb's default (WANDB_MODE); 'offline' logs to <workdir>/wandb, no network
    c.seed = 0
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.nan_policy = "stop"

    if preset == "tiny":
        pass
    elif preset == "tiny_pairs":
        c.data.pairs_as_examples = True
    elif preset == "paper_6b":
        c.model = model_presets.model_config("gpt3_6p7b")
        c.model.head = "scalar"
        c.model.dropout_rate = 0.0
        c.optim.lr = 9e-6
        c.data.max_len = 2048
        c.data.max_prompt_len = 1024
        c.eval_every = 100
        c.checkpoint_every = 100
    else:
        raise ValueError(f"unknown rm preset {preset!r}: {', '.join(PRESETS)}")
    return c

"""Stage 1 (SFT) and stage 0 (base-model pretraining): one trainer, ``instructjax/train_sft.py``.

    python scripts/train_sft.py --config=configs/sft.py:tiny --workdir=/tmp/sft --config.data.world_dir=/tmp/world

Presets:
- ``tiny``: SFT of the tiny model on the synthetic world's demonstrations (paper recipe: 16 epochs,
  residual dropout 0.2, cosine to 10%, no warmup; batch and LR scaled for a 150k-parameter model).
- ``base``: stage 0, the synthetic world's base model: the same objective with no prompt masking, on
  packed pretraining text (no dropout).
- ``ppo_init``: the paper's PPO-init SFT (App. C.3): 2 epochs with 10% pretraining data mixed in.
- ``paper_1p3b``, ``paper_6b``: the paper's SFT hyperparameters on the GPT-3 shapes (§3.5, App. C.1).
"""

import ml_collections

from instructjax.configlib import sibling

model_presets = sibling(__file__, "model")

PRESETS = ("tiny", "base", "ppo_init", "paper_1p3b", "paper_6b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.stage = "sft"  # informational: which trainer this config is for
    c.model = model_presets.model_config("tiny")  # architecture (configs/model.py)
    c.model.dropout_rate = 0.2  # the paper's SFT residual dropout

    c.data = ml_collections.ConfigDict()
    c.data.world_dir = ""  # directory of the jsonl files (scripts/make_synthetic_data.py writes one)
    c.data.tokenizer = ""  # tokenizer.json / *.model / HF dir; "" = <world_dir>/tokenizer.json
    c.data.cache_dir = ""  # where TFDS array_record datasets are built; "" = <world_dir>/tfds
    c.data.kind = "demos"  # 'demos' (SFT) or 'pretrain' (stage 0: packed text, no prompt masking)
    c.data.train_file = "demos_train.jsonl"  # relative to world_dir
    c.data.valid_file = "demos_valid.jsonl"
    c.data.pretrain_file = "pretrain_train.jsonl"  # for kind='pretrain' and for the ptx mix
    c.data.pretrain_valid_file = "pretrain_heldout.jsonl"
    c.data.ptx_fraction = 0.0  # pretraining text's share of the loss and of the rows (paper's PPO-init SFT: 0.1)
    c.data.max_len = 32  # tokens per sequence (prompt + response + EOS); packed row length for pretraining
    c.data.max_prompt_len = 16  # prompt tokens for generation (evaluation samples)
    c.data.prompt_template = "{prompt}"  # applied to each prompt before tokenizing
    c.data.prompt_in_loss = False  # ablation: predict the prompt tokens too (paper leaves masking open)
    c.data.skip_bad = False  # skip (and count) malformed jsonl lines instead of failing

    c.batch_size = 32  # sequences per optimizer step (the paper: 32 for 1.3B/6B)
    c.eval_batch_size = 64
    c.loss_chunk = 512  # positions per chunk of the fused LM head + cross-entropy (losses.fused_lm_loss)
    c.eval_batches = 0  # pretraining eval: batches of held-out text (0 = 8)
    c.num_epochs = 16.0  # the paper's SFT: 16 epochs
    c.num_steps = 0  # if > 0, overrides num_epochs

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3  # peak learning rate (tiny model; the paper's 1.3B/6B use 9.65e-6)
    c.optim.warmup_steps = 0  # the paper's SFT: no warmup
    c.optim.final_lr_fraction = 0.1  # cosine decay to 10% of peak (paper)
    c.optim.b1 = 0.9  # Adam betas of the paper
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0  # the paper does not state any
    c.optim.grad_clip = 1.0  # global-norm clipping (0 disables); not stated by the paper
    c.optim.grad_accum_steps = 1  # micro-batches per update (batch_size is per micro-batch)

    c.init_from = ""  # workdir of a previous stage whose final params initialise the model (e.g. the base model)
    c.select_by = "val_loss"  # which eval picks workdir/best: 'val_loss' or 'score' (a score_fn, e.g. RM score)
    c.mesh_shape = (1, -1, 1)  # (data, fsdp, tensor); -1 fills
    c.rules = [list(r) for r in model_presets.DEFAULT_RULES]  # logical axis -> mesh axes
    c.logging = ml_collections.ConfigDict()  # metrics.jsonl and TensorBoard always; Weights & Biases if asked
    c.logging.wandb = False  # needs `pip install wandb`; off by default
    c.logging.wandb_project = "instructjax"
    c.logging.wandb_mode = ""  # '' = wandb's default (WANDB_MODE); 'offline' logs to <workdir>/wandb, no network
    c.seed = 0  # init, dropout and data order
    c.log_every = 10  # steps between metrics.jsonl lines
    c.eval_every = 100  # steps between validation passes (and at the end)
    c.checkpoint_every = 200  # steps between checkpoints (and at the end, and on SIGTERM)
    c.keep_checkpoints = 2
    c.nan_policy = "stop"  # 'stop': a non-finite loss/grad ends the run naming the step; 'skip': skip and count

    if preset == "tiny":
        pass
    elif preset == "base":
        c.stage = "pretrain"
        c.model.dropout_rate = 0.0
        c.data.kind = "pretrain"
        c.data.max_len = 128  # packed rows: most synthetic documents (about 60 words) fit whole
        c.batch_size = 16
        c.num_epochs = 1.0
        c.optim.warmup_steps = 50
        c.optim.lr = 2e-3
    elif preset == "ppo_init":
        c.num_epochs = 2.0  # App. C.3
        c.data.ptx_fraction = 0.1
    elif preset in ("paper_1p3b", "paper_6b"):
        c.model = model_presets.model_config("gpt3_1p3b" if preset == "paper_1p3b" else "gpt3_6p7b")
        c.model.dropout_rate = 0.2
        c.optim.lr = 9.65e-6  # §3.5 / App. C.1 (both sizes)
        c.data.max_len = 2048
        c.data.max_prompt_len = 1024
        c.eval_every = 500
        c.checkpoint_every = 500
    else:
        raise ValueError(f"unknown sft preset {preset!r}: {', '.join(PRESETS)}")
    return c

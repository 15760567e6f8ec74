"""TL;DR summarization (Stiennon et al. 2020) with the settings of Huang et al. 2024, "The N+ implementation
details of RLHF with PPO"; the paper's PPO-ptx beside it.

    python scripts/prepare_data.py --source=tldr --input=/data/summarize_from_feedback/comparisons \
        --sft_input=/data/tldr_sft --out=/data/tldr --tokenizer=/models/policy --recipe=configs/recipes/tldr.py
    python scripts/convert_hf.py --to=instructjax --hf_dir=/models/policy --workdir=workdirs/policy \
        --compute_dtype=bfloat16
    python scripts/pipeline.py --config=configs/recipes/tldr.py:gpu --workdir=workdirs/tldr \
        --config.data_dir=/data/tldr --config.base_from=workdirs/policy

The policy: a GPT-2-family or Llama-family base model of about 1B parameters (Huang et al. use Pythia, whose
GPT-NeoX layout we do not import). Stages: SFT on the human TL;DR summaries (one epoch), the RM on the
K = 2 comparisons (one epoch), then ``ppo`` with the N+ settings, started from SFT (``ppo_from='sft'``, no
PPO-init stage): 53-token responses, rollout temperature 0.7, fixed β 0.05, 4 PPO epochs over each batch,
value coefficient 0.1, no reward whitening, the missing-EOS penalty. ``ppo_ptx`` is the same with the
paper's pretraining term (γ 27.8, 8 rows per episode; the pretraining text is TL;DR's own unless
``prepare_data.py --pretrain`` gave another). Presets: ``gpu`` (one 80 GB GPU), ``tpu`` (a v5e-8 slice),
``smoke`` (a few steps; ``tests/test_recipes.py``).
"""

import ml_collections

from instructjax.configlib import sibling

common = sibling(__file__, "common")

PRESETS = common.PRESETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "gpu"
    # 512 prompt tokens (Huang et al. 2024 truncate the post to fit them), 53 summary tokens, LR 3e-6
    c = common.recipe(preset, max_len=576, max_prompt_len=512, response_len=53, lr=3e-6, sft_epochs=1.0)
    c.rm.data.k_max = 2  # every comparison is a pair: no padding to nine
    c.ppo_from = "sft"  # N+: PPO starts from the SFT model, which is also the KL reference
    for stage in (c.ppo, c.ppo_ptx):
        stage.temperature = 0.7
        stage.kl.mode, stage.kl.init_coef = "fixed", 0.05
        stage.ppo_epochs = 4
        stage.value_coef = 0.1
        stage.whiten_rewards = False
        stage.use_missing_eos_penalty = True
        if preset != "smoke":
            stage.max_new_tokens = 53
            stage.total_episodes = 128_000  # about one pass over TL;DR's SFT posts; raise it for longer runs
    c.ppo_ptx.ptx_coef = 27.8  # the paper's γ (App. C.4)
    return c

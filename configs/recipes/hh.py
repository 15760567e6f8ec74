"""Anthropic HH-RLHF (Bai et al. 2022): dialogues, K = 2 comparisons, the paper's InstructGPT stages.

    python scripts/prepare_data.py --source=hh --input=/data/hh-rlhf --out=/data/hh \
        --tokenizer=/models/policy --recipe=configs/recipes/hh.py
    python scripts/convert_hf.py --to=instructjax --hf_dir=/models/policy --workdir=workdirs/policy \
        --compute_dtype=bfloat16
    python scripts/pipeline.py --config=configs/recipes/hh.py:gpu --workdir=workdirs/hh \
        --config.data_dir=/data/hh --config.base_from=workdirs/policy

SFT on the chosen replies (HH has no separate demonstrations; ``prepare_data.py`` writes each pair's chosen
turn as a demo), the RM on the pairs, PPO-init with 10% pretraining text, then PPO and PPO-ptx with the
paper's settings (App. C.4: batch 512, minibatch 64, one epoch, β 0.02, γ 27.8). Prompts are whole
dialogues: 768 tokens, and 256 for the reply. Presets: ``gpu``, ``tpu``, ``smoke``.
"""

import ml_collections

from instructjax.configlib import sibling

common = sibling(__file__, "common")

PRESETS = common.PRESETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "gpu"
    # the paper's SFT LR (§3.5); one epoch over the chosen replies, where the paper trains 16 on its demos
    c = common.recipe(preset, max_len=1024, max_prompt_len=768, response_len=256, lr=9.65e-6, sft_epochs=1.0)
    c.rm.data.k_max = 2  # every comparison is a pair: no padding to nine
    for stage in (c.ppo, c.ppo_ptx):
        stage.kl.mode, stage.kl.init_coef = "fixed", 0.02  # the paper's β
    return c

"""UltraFeedback (Cui et al. 2023) as the InstructGPT reward model was trained: one K-way ranking per prompt.

    python scripts/prepare_data.py --source=ultrafeedback --input=/data/UltraFeedback --out=/data/uf \
        --rating=overall --tokenizer=/models/instruct --recipe=configs/recipes/ultrafeedback.py
    python scripts/convert_hf.py --to=instructjax --hf_dir=/models/instruct --workdir=workdirs/instruct \
        --compute_dtype=bfloat16
    python scripts/pipeline.py --config=configs/recipes/ultrafeedback.py:gpu --workdir=workdirs/uf \
        --config.data_dir=/data/uf --config.base_from=workdirs/instruct

Each prompt's four completions are ranked by their rating, equal ratings tied, and the RM is trained on
all C(K,2) pairs of a prompt as one batch element (Eq. 1, App. C.2) where other libraries flatten them into
independent pairs. The policy is an instruct model with a chat template (prompts are rendered with it);
SFT on each prompt's best completion, then PPO-ptx with the paper's settings. Presets: ``gpu``, ``tpu``,
``smoke``.
"""

import ml_collections

from instructjax.configlib import sibling

common = sibling(__file__, "common")

PRESETS = common.PRESETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "gpu"
    c = common.recipe(preset, max_len=1024, max_prompt_len=512, response_len=512, lr=5e-6, sft_epochs=1.0)
    c.rm.data.k_max = 4  # UltraFeedback rates four completions per prompt: no padding to nine
    for stage in (c.ppo, c.ppo_ptx):
        stage.kl.mode, stage.kl.init_coef = "fixed", 0.02  # the paper's β
    return c

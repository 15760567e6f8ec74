"""What the public-data recipes share: the pipeline (configs/pipeline.py) on prepared data from an imported
model, sized for one GPU or a TPU slice, and the ``smoke`` preset the tests run on a tiny imported model.

Every recipe needs two paths: ``data_dir`` (``scripts/prepare_data.py --out``) and ``base_from``
(``scripts/convert_hf.py --workdir``); the architecture, dtype and tokenizer come from the imported model.
The hardware presets set the mesh and the micro-batch; the optimizer still sees the recipe's batch
(``grad_accum_steps``). Sizes assume a policy of about 0.5-1.5B parameters imported in bf16 compute
(``convert_hf.py --compute_dtype=bfloat16``); a larger one needs more chips (``configs/tpu.py``).
"""

import pathlib

import ml_collections

from instructjax import configlib

pipeline = configlib.load_module(pathlib.Path(__file__).parents[1] / "pipeline.py")
ppo_presets = configlib.load_module(pathlib.Path(__file__).parents[1] / "ppo.py")

PRESETS = ("gpu", "tpu", "smoke")
# mesh (data, fsdp, tensor) and sequences per device step; tpu_slice is informational (what it was sized for)
HARDWARE = {
    "gpu": dict(mesh_shape=(1, -1, 1), micro_batch=8, tpu_slice=""),  # one 80 GB GPU (H100/A100)
    "tpu": dict(mesh_shape=(1, -1, 1), micro_batch=32, tpu_slice="v5e:2x4"),  # 8 chips, FSDP over all of them
}


def _accumulate(stage: ml_collections.ConfigDict, batch: int, micro_batch: int, optims=("optim",)) -> None:
    """``batch`` sequences per update in steps of at most ``micro_batch``."""
    accum = max(1, batch // micro_batch)
    for name in optims:
        stage[name].grad_accum_steps = accum


def recipe(
    preset: str,
    *,
    max_len: int,
    max_prompt_len: int,
    response_len: int,
    lr: float,
    sft_epochs: float,
) -> ml_collections.ConfigDict:
    """The pipeline config with every stage sized for an imported model on ``preset``'s hardware."""
    if preset not in PRESETS:
        raise ValueError(f"unknown recipe preset {preset!r}: {', '.join(PRESETS)}")
    c = pipeline.get_config("default")
    c.data_dir = ""  # required: the directory scripts/prepare_data.py wrote
    c.base_from = ""  # required: the workdir scripts/convert_hf.py wrote
    c.ppo = ppo_presets.get_config("paper_1p3b")  # the paper's PPO (App. C.4); each recipe adjusts it
    c.ppo_ptx = ppo_presets.get_config("paper_1p3b")  # PPO-ptx: γ 27.8, 8 pretraining rows per episode
    c.ppo.ptx_coef = 0.0
    c.ppo.stage, c.ppo_ptx.stage = "ppo", "ppo_ptx"
    for name in ("sft", "rm", "ppo_init"):
        stage = c[name]
        stage.data.max_len, stage.data.max_prompt_len = max_len, max_prompt_len
        stage.optim.lr = lr
        stage.optim.warmup_steps = 0
        stage.model.dropout_rate = 0.0  # a pretrained model: no dropout (Huang et al. 2024)
        stage.log_every, stage.eval_every, stage.checkpoint_every = 10, 200, 200
    c.sft.num_epochs = c.ppo_init.num_epochs = sft_epochs
    c.sft.batch_size = c.ppo_init.batch_size = 32  # the paper's SFT batch (§3.5)
    c.rm.batch_size = 64  # prompts per step (the paper, App. C.2); one epoch
    c.rm.num_epochs = 1.0
    c.ppo_init.select_by = "val_loss"
    for stage in (c.ppo, c.ppo_ptx):
        stage.max_new_tokens = response_len
        stage.data.max_prompt_len = max_prompt_len
        stage.data.ptx_len = max_len
        stage.optim.lr = lr
        stage.value_optim.lr = lr
        stage.frozen_dtype = "bfloat16"
        stage.eval_prompts, stage.eval_batch_size = 256, 64
        stage.eval_every, stage.checkpoint_every = 20, 20
    c.eval.max_new_tokens = response_len
    c.eval.prompts, c.eval.kl_prompts, c.eval.select_prompts, c.eval.batch_size = 1000, 256, 256, 64
    if preset == "smoke":
        smoke(c)
        return c
    hw = HARDWARE[preset]
    c.tpu_slice = hw["tpu_slice"]
    for name in ("sft", "rm", "ppo_init", "ppo", "ppo_ptx"):
        c[name].mesh_shape = hw["mesh_shape"]
    for name in ("sft", "ppo_init"):
        _accumulate(c[name], c[name].batch_size, hw["micro_batch"])
        c[name].batch_size = min(c[name].batch_size, hw["micro_batch"])
    # an RM element is a prompt with up to 9 completions: a quarter of the micro-batch in prompts
    rm_micro = max(1, hw["micro_batch"] // 4)
    _accumulate(c.rm, c.rm.batch_size, rm_micro)
    c.rm.batch_size = min(c.rm.batch_size, rm_micro)
    for stage in (c.ppo, c.ppo_ptx):
        _accumulate(stage, stage.minibatch_size, hw["micro_batch"], optims=("optim", "value_optim"))
        stage.minibatch_size = min(stage.minibatch_size, hw["micro_batch"])
    return c


def smoke(c: ml_collections.ConfigDict) -> None:
    """A few steps of every stage at tiny lengths: the recipe's code path on a test's tiny imported model."""
    for name in ("sft", "rm", "ppo_init"):
        c[name].update_from_flattened_dict(
            {"num_steps": 2, "eval_every": 2, "log_every": 1, "checkpoint_every": 2, "batch_size": 8}
        )
        c[name].data.max_len, c[name].data.max_prompt_len = 48, 32
        c[name].optim.lr = 1e-3
    for stage in (c.ppo, c.ppo_ptx):
        stage.update_from_flattened_dict(
            {
                "num_iterations": 1,
                "batch_size": 16,
                "minibatch_size": 8,
                "eval_every": 1,
                "checkpoint_every": 1,
                "eval_prompts": 8,
                "eval_batch_size": 8,
                "ptx_ratio": 1,
                "max_new_tokens": 8,
                "data.ptx_len": 32,
                "data.max_prompt_len": 32,
                "frozen_dtype": "",
                "optim.warmup_steps": 0,
            }
        )
    c.eval.update(dict(prompts=8, kl_prompts=8, select_prompts=8, batch_size=8, max_new_tokens=8))

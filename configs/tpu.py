"""TPU presets: the paper's SFT, RM and PPO-ptx settings at full scale, each sized for a TPU slice.

    python scripts/aot_compile.py --config=configs/tpu.py:sft_1p3b          # compile for its tpu_slice, no TPU
    python scripts/train_sft.py --config=configs/tpu.py:sft_1p3b --workdir=/mnt/gcs/run/sft --config.data.world_dir=...

Presets ``<stage>_<size>``: stage ``sft`` (§3.5 / App. C.1), ``rm`` (App. C.2), ``ppo_ptx`` (App. C.4, γ 27.8);
size ``1p3b`` and ``6p7b`` (GPT-3 shapes, Brown et al. Table 2.1) and ``llama3_8b`` (Llama-3 8B shape, the
paper's 6B settings). The hyperparameters come from ``configs/sft.py``, ``rm.py`` and ``ppo.py`` (their
``paper_*`` presets); this file adds only what a slice needs:

- ``tpu_slice``: the smallest slice the preset compiles for and fits in HBM (``scripts/aot_compile.py``;
  docs/scaling.md has the measured per-chip memory and what each memory-saving choice below saves);
- ``mesh_shape`` for that slice (data, fsdp, tensor): parameters and Adam state FSDP-sharded, the batch
  split over data × fsdp;
- memory: bf16 compute with f32 master weights, ``scan_layers`` (one compiled block: compile time
  independent of depth) and ``remat`` (``model.py``), bf16 frozen reference and RM in PPO (``frozen_dtype``),
  and where one step's activations do not fit, a smaller per-step batch with gradient accumulation
  (``optim.grad_accum_steps``: the update still sees the paper's batch).

The RM the paper uses for every policy size is the 6B one (§3.5, C.2), and the PPO value model starts from it
(C.4): ``ppo_ptx_1p3b`` therefore pairs a 1.3B policy with a 6.7B value model and RM. ``rm_1p3b`` is for a
pipeline kept at 1.3B (not in the paper). A PPO config reads its models from ``policy_from``/``rm_from`` at
run time; ``aot.policy_model`` and ``aot.value_model`` state the architectures those workdirs hold, so the
preset compiles without them. Data paths are needed only to train.
"""

import ml_collections

from instructjax.configlib import sibling

model_presets = sibling(__file__, "model")
sft_presets = sibling(__file__, "sft")
rm_presets = sibling(__file__, "rm")
ppo_presets = sibling(__file__, "ppo")

_MODEL = {"1p3b": "gpt3_1p3b", "6p7b": "gpt3_6p7b", "llama3_8b": "llama3_8b"}
_PAPER = {"1p3b": "paper_1p3b", "6p7b": "paper_6b", "llama3_8b": "paper_6b"}  # which paper setting a size uses

# Per preset: the slice, its mesh (data, fsdp, tensor), and the per-step batch where the paper's does not fit
# in one step (``grad_accum_steps`` micro-batches per update). Measured in docs/scaling.md.
SLICES = {
    "sft_1p3b": dict(tpu_slice="v5e:2x2", mesh_shape=(1, 4, 1)),
    "sft_6p7b": dict(tpu_slice="v5e:4x4", mesh_shape=(1, 16, 1)),
    "sft_llama3_8b": dict(tpu_slice="v5e:4x4", mesh_shape=(1, 16, 1)),
    # RM: one prompt is K = 9 sequences of 2k tokens, so a micro-batch of one prompt per batch shard, and heads
    # split over the tensor axis (the attention scores of 9 x 2k tokens dominate the step's memory).
    "rm_1p3b": dict(tpu_slice="v5e:2x2", mesh_shape=(1, 2, 2), batch_size=2, grad_accum_steps=32),
    "rm_6p7b": dict(tpu_slice="v5e:4x8", mesh_shape=(1, 4, 8), batch_size=4, grad_accum_steps=16),
    "rm_llama3_8b": dict(tpu_slice="v5e:4x8", mesh_shape=(1, 4, 8), batch_size=4, grad_accum_steps=16),
    # PPO: the slice is set by the rollout (a KV cache of 512 x 2k tokens; the 6.7B value model and RM over them)
    # and the four models' state. An update step holds one episode and 8 pretraining rows per batch shard: the
    # paper's minibatch of 64 episodes (+ 8 x 64 rows) in one step on 64 batch shards, else in micro-batches.
    "ppo_ptx_1p3b": dict(tpu_slice="v5e:8x8", mesh_shape=(1, 64, 1)),
    "ppo_ptx_6p7b": dict(tpu_slice="v5e:8x16", mesh_shape=(1, 32, 4), minibatch_size=32, grad_accum_steps=2),
    "ppo_ptx_llama3_8b": dict(tpu_slice="v5e:8x8", mesh_shape=(1, 8, 8), minibatch_size=8, grad_accum_steps=8),
}
PRESETS = tuple(SLICES)


def _model(size: str, head: str = "lm") -> ml_collections.ConfigDict:
    m = model_presets.model_config(_MODEL[size])  # bf16 compute, f32 params, remat 'full', scan_layers
    m.head = head
    return m


def _mesh(c: ml_collections.ConfigDict, name: str, vocab_size: int) -> None:
    c.tpu_slice = SLICES[name]["tpu_slice"]  # the smallest TPU slice this preset compiles for and fits on
    c.mesh_shape = SLICES[name]["mesh_shape"]
    if vocab_size % 8:  # GPT-3's 50257 = 29 x 1733 splits over no tensor axis of 2, 4 or 8: keep it whole
        c.rules = [[name_, None if name_ == "vocab" else axes] for name_, axes in c.rules]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "sft_1p3b"
    if name not in SLICES:
        raise ValueError(f"unknown tpu preset {name!r}: {', '.join(PRESETS)}")
    stage, size = name.split("_", 1) if not name.startswith("ppo_ptx_") else ("ppo_ptx", name[len("ppo_ptx_") :])
    knobs = SLICES[name]
    if stage == "sft":
        c = sft_presets.get_config(_PAPER[size])  # 16 epochs, dropout 0.2, LR 9.65e-6, batch 32, 2k context
        c.model = _model(size)
        c.model.dropout_rate = 0.2
    elif stage == "rm":
        c = rm_presets.get_config("paper_6b")  # 1 epoch, LR 9e-6, 64 prompts x up to 9 completions
        c.model = _model(size, head="scalar")
        c.model.dropout_rate = 0.0
    else:
        c = ppo_presets.get_config(_PAPER[size])  # 512 episodes, minibatch 64, β 0.02, γ 27.8, 8x ptx rows
        c.aot = ml_collections.ConfigDict()
        c.aot.policy_model = _model(size)  # what policy_from will hold (the PPO-init SFT)
        # what rm_from will hold: the paper's 6B RM for the GPT-3 sizes (§3.5), the same shape for Llama
        c.aot.value_model = _model("6p7b" if size == "1p3b" else size, head="scalar")
    _mesh(c, name, (c.model if "model" in c else c.aot.policy_model).vocab_size)
    # A smaller per-step batch with accumulation: the optimizer still sees the paper's batch per update.
    if "batch_size" in knobs:
        c.batch_size = knobs["batch_size"]
    if "minibatch_size" in knobs:
        c.minibatch_size = knobs["minibatch_size"]
    accum = knobs.get("grad_accum_steps", 1)
    c.optim.grad_accum_steps = accum
    if stage == "ppo_ptx":
        c.value_optim.grad_accum_steps = accum
        shards = c.mesh_shape[0] * c.mesh_shape[1]  # evaluation prompts are sharded over the batch shards
        c.eval_batch_size = -(-c.eval_prompts // shards) * shards
    else:  # validation batches of the step's size: a forward pass of what the train step fits
        c.eval_batch_size = c.batch_size
    return c

"""Hugging Face interop: import and export safetensors checkpoints of the GPT-2 and Llama families.

Supported ``model_type``s: ``gpt2``, ``llama`` (Llama 2/3 without rope scaling), ``mistral`` and ``qwen2``
(q/k/v biases). ``docs/hf.md`` has the full name mapping and what is refused. The package is split by
responsibility, and every public name is re-exported here (``from instructjax import hf; hf.load_hf(...)``):

- ``instructjax.hf.config``: ``config.json`` <-> ``ModelConfig`` (``config_from_hf``, ``config_to_hf``,
  ``family_of``), the refused features and the ``model_type`` families;
- ``instructjax.hf.tensors``: tensor name/shape mapping (``_Map``, ``hf_tensors``) and safetensors reading,
  sharded or not, each device reading only its own slice (``_Checkpoint``);
- ``instructjax.hf.convert``: ``load_hf``, ``export_hf``, ``import_to_workdir``, ``export_workdir`` and
  ``copy_tokenizer``.

Import (``load_hf``) reads ``config.json`` into a ``ModelConfig`` and the ``*.safetensors`` files
(one file, or shards listed by ``model.safetensors.index.json``) straight onto the params' target
shardings: each parameter is built with ``jax.make_array_from_callback`` and each device's callback
reads only its own slice of the tensor (``safe_open(..., framework="numpy").get_slice``), so no full
copy of a sharded model ever sits on one device or host. Only safetensors are read: a pickle-only
checkpoint (``pytorch_model.bin``) is refused, never unpickled, because unpickling runs arbitrary code.

Every tensor is described by one ``_Map``: ours = ``hf.reshape(split)[pick].transpose(perm)``, possibly
zero-padded along the vocabulary. The same description drives both directions, so export (``export_hf``)
is the exact inverse of import and a round trip is bit-exact.

Vocabulary padding. Tensor parallelism shards the vocabulary over the ``tensor`` axis, which needs a
vocabulary divisible by it. ``pad_vocab_to_multiple`` appends zero rows to the embedding (and zero
columns to an untied lm head) on import; export strips them (``vocab_size``). ``min_vocab_size`` pads
too: our tokenizer adds a PAD id equal to the vocabulary size when a tokenizer has no pad token (GPT-2,
Llama 2), and the model needs a row for it. Padded ids get logit 0, not -inf: the tokenizer produces
none of them (PAD is masked), but a sampler could pick one when every real logit is negative.
Replicating the vocabulary instead (the rule ``("vocab", None)``) needs no padding for the mesh.

Reward models. Our reward model (``head='scalar'``: ``score_head`` kernel [D,1] and bias [1]) exports as
``<Family>ForSequenceClassification`` with one label: ``score.weight`` [1,D]. Transformers' score layer
has no bias, so the head's bias minus ``reward_bias`` (the normalisation constant the RM stage
subtracts from rewards) goes into ``config.json`` as ``instructjax_reward_offset``: transformers' logits
differ from our reward by that constant (rankings and pairwise losses are unaffected), and import puts
it back into the bias. Transformers reads the score at the last non-pad token of each row (it needs
``pad_token_id`` in ``config.json``); our reward is read at the EOS token, which is the last real token,
so the two agree when sequences end in EOS and padding uses ``pad_token_id``.
"""

from instructjax.hf.config import (
    CAUSAL_LM,
    FAMILIES,
    REWARD_OFFSET_KEY,
    SEQ_CLS,
    HFModelInfo,
    config_from_hf,
    config_to_hf,
    family_of,
)
from instructjax.hf.convert import (
    TOKENIZER_FILES,
    HFModel,
    copy_tokenizer,
    export_hf,
    export_workdir,
    import_to_workdir,
    load_hf,
)
from instructjax.hf.tensors import _BUFFERS, _Checkpoint, hf_tensors

__all__ = [
    "CAUSAL_LM",
    "FAMILIES",
    "REWARD_OFFSET_KEY",
    "SEQ_CLS",
    "TOKENIZER_FILES",
    "HFModel",
    "HFModelInfo",
    "_BUFFERS",  # tests/test_hf.py: known non-parameter buffers
    "_Checkpoint",  # tests/test_hf.py spies on _Checkpoint.read
    "config_from_hf",
    "config_to_hf",
    "copy_tokenizer",
    "export_hf",
    "export_workdir",
    "family_of",
    "hf_tensors",
    "import_to_workdir",
    "load_hf",
]

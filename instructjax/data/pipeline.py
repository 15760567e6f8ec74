"""grain pipelines per stage: tokenize, truncate (counted), pad, shuffle by seed, shard per process, batch.

Every pipeline is ``grain.MapDataset.source(records).shuffle(seed).repeat(epochs).batch(global batch)``
then, per process, ``encode`` of its own rows only, so order is a pure function of the seed and the
iterator state (``it.get_state()``, saved in checkpoints) resumes exactly. ``shuffle`` then ``repeat``
reshuffles every epoch. Multi-host: every process walks the same global record stream and keeps a
contiguous block of ``batch_size / process_count`` rows of each global batch (``batch_size`` is always the
global size), so the global batch, and the loss, are the same on any number of hosts.

Batch conventions (numpy, B rows; T = ``TextFormat.max_len``):

- SFT (``sft_batches``): ``tokens [B,T]`` right-padded, ``mask [B,T]`` real tokens, ``loss_mask [B,T]``
  the tokens that are *predicted* (the response and its EOS; with ``prompt_in_loss`` every real token
  but the first): the loss is ``CE(logits[:, :-1], tokens[:, 1:])`` weighted by ``loss_mask[:, 1:]``.
- Pretraining (``pretrain_batches``): documents + EOS packed first-fit into rows of T tokens with
  ``segment_ids [B,T]`` (0 = padding); ``mask``/``loss_mask`` as above, a segment's first token is not
  predicted. Documents longer than T are truncated (counted).
- Comparisons (``comparison_batches``): every completion of a prompt in one element, ``tokens [B,K,T]``,
  ``mask [B,K,T]``, ``valid [B,K]`` (K = ``k_max``; missing completions masked), ``pair_mask [B,K,K]``
  with ``pair_mask[b, i, j] = 1`` when completion i is ranked above j (ties dropped). The RM reads its
  reward at the last real token (the EOS). ``pairs_as_examples`` gives the paper's shuffled-pairs
  ablation instead: every pair its own element (K = 2), shuffled across the dataset.
- Packed comparisons (``packed_comparison_batches``): the same comparisons without the padding completions.
  A batch is a fixed budget of R completion rows, ``tokens [R,T]``, ``mask [R,T]``, holding as many whole
  prompts as fit in the shuffled order (a prompt never straddles two batches, a batch never straddles two
  epochs), and a fixed number G of prompt slots: ``slots [G,K]`` (the row of each prompt's completion k),
  ``valid [G,K]``, ``pair_mask [G,K,K]`` and ``row_valid [G]`` as in the padded batch. The loss gathers
  ``rewards[slots]`` into the padded ``[G,K]`` layout and is the padded loss (``train_rm.make_loss_fn``).
  One shape for every batch, so one compiled step; padding is the rows left over when the next prompt does
  not fit (``pack_plan``), a few percent for R of a few dozen rows or more.
- Prompts (``prompt_batches``): ``prompt [B,P]`` left-padded for generation, ``prompt_mask [B,P]``.

Every batch also has ``row_valid [B]``: with ``num_epochs`` set, the last batch is padded with empty rows
(``row_valid = 0``) instead of changing shape, which would recompile the step.

Truncation (rule in ``formats.truncate``: the prompt is cut from the left, the response kept) is counted
in ``TextFormat.stats``; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from instructjax.data import formats
from instructjax.data.tfds_builder import decode
from instructjax.tokenizer import Tokenizer


class _Counter:
    """Thread-safe ``formats.TruncationStats`` (grain maps in threads)."""

    def __init__(self):
        self.stats = formats.TruncationStats()
        self._lock = threading.Lock()

    def truncate(
        self, prompt: Sequence[int], response: Sequence[int], max_len: int, min_prompt_tokens: int = 1
    ) -> tuple[list[int], list[int]]:
        with self._lock:
            return formats.truncate(prompt, response, max_len, self.stats, min_prompt_tokens)


@dataclasses.dataclass
class TextFormat:
    """How rows become token sequences.

    Prompt and completion are encoded separately and concatenated (a BPE tokenizer may want the
    completion to start with a space: put it in the data or the template).
    """

    tokenizer: Tokenizer
    max_len: int  # prompt + response (+ EOS) tokens per sequence
    max_prompt_len: int  # prompt tokens for generation (left-padded)
    prompt_template: str = "{prompt}"  # applied to every prompt before tokenizing
    prompt_in_loss: bool = False  # the SFT ablation: predict prompt tokens too
    counter: _Counter = dataclasses.field(default_factory=_Counter)

    @property
    def stats(self) -> formats.TruncationStats:
        return self.counter.stats

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(self.prompt_template.format(prompt=prompt))

    def response_ids(self, completion: str) -> list[int]:
        return self.tokenizer.encode(completion) + [self.tokenizer.eos_id]


def _right_pad(ids: Sequence[int], length: int, pad_id: int) -> np.ndarray:
    out = np.full((length,), pad_id, np.int32)
    out[: len(ids)] = ids
    return out


def encode_demo(row: dict, fmt: TextFormat) -> dict[str, np.ndarray]:
    prompt, response = fmt.counter.truncate(
        fmt.prompt_ids(row["prompt"]), fmt.response_ids(row["completion"]), fmt.max_len
    )
    n = len(prompt) + len(response)
    loss_mask = np.zeros((fmt.max_len,), np.int32)
    loss_mask[1 if fmt.prompt_in_loss else len(prompt) : n] = 1
    mask = np.zeros((fmt.max_len,), np.int32)
    mask[:n] = 1
    return {
        "tokens": _right_pad(prompt + response, fmt.max_len, fmt.tokenizer.pad_id),
        "mask": mask,
        "loss_mask": loss_mask,
    }


def encode_comparison(row: dict, fmt: TextFormat, k_max: int) -> dict[str, np.ndarray]:
    k = len(row["completions"])
    if k > k_max:
        raise ValueError(f"comparison with K={k} completions exceeds k_max={k_max} (raise data.k_max)")
    tokens = np.full((k_max, fmt.max_len), fmt.tokenizer.pad_id, np.int32)
    mask = np.zeros((k_max, fmt.max_len), np.int32)
    prompt_ids = fmt.prompt_ids(row["prompt"])
    for i, completion in enumerate(row["completions"]):
        prompt, response = fmt.counter.truncate(prompt_ids, fmt.response_ids(completion), fmt.max_len)
        tokens[i, : len(prompt) + len(response)] = prompt + response
        mask[i, : len(prompt) + len(response)] = 1
    valid = (np.arange(k_max) < k).astype(np.int32)
    pair_mask = np.zeros((k_max, k_max), np.int32)
    for winner, loser in formats.ranking_pairs(row["ranking"]):
        pair_mask[winner, loser] = 1
    return {"tokens": tokens, "mask": mask, "valid": valid, "pair_mask": pair_mask}


def encode_prompt(row: dict, fmt: TextFormat) -> dict[str, np.ndarray]:
    prompt, _ = fmt.counter.truncate(fmt.prompt_ids(row["prompt"]), [], fmt.max_prompt_len)
    tokens = np.full((fmt.max_prompt_len,), fmt.tokenizer.pad_id, np.int32)
    mask = np.zeros((fmt.max_prompt_len,), np.int32)
    tokens[fmt.max_prompt_len - len(prompt) :], mask[fmt.max_prompt_len - len(prompt) :] = prompt, 1
    return {"prompt": tokens, "prompt_mask": mask}


def _stack(batch_size: int, elements: Sequence[dict[str, np.ndarray]], placeholder: dict | None = None) -> dict:
    """Stack elements, padding a short final batch with zero rows marked ``row_valid = 0``. A process
    whose slice of the last batch is empty stacks a zeroed ``placeholder`` (any element) instead."""
    if not elements:
        if placeholder is None:
            raise ValueError("a batch of padding only")
        elements = [{k: np.zeros_like(v) for k, v in placeholder.items()}]
        real = 0
    else:
        real = len(elements)
    out = {k: np.stack([e[k] for e in elements]) for k in elements[0]}
    missing = batch_size - len(elements)
    if missing:
        out = {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in out.items()}
    out["row_valid"] = (np.arange(batch_size) < real).astype(np.int32)
    return out


def pack_plan(ks: Sequence[int], rows: int, max_prompts: int) -> list[list[int]]:
    """Greedy packing in order: positions ``0..len(ks)-1`` cut into consecutive batches, each a run of prompts
    whose completion counts sum to at most ``rows`` (and at most ``max_prompts`` prompts):

        batch n = [i_n, i_{n+1}),  i_{n+1} = the largest j with Σ_{i_n ≤ i < j} ks[i] ≤ rows, j - i_n ≤ max_prompts

    Every position is in exactly one batch and the order is kept (the shuffle stays the padded pipeline's).
    A batch cut because the next prompt does not fit wastes fewer than max(ks) rows (with ``max_prompts`` ≥
    rows / min(ks), as ``packed_plan`` sets it, that is every cut but an epoch's last batch).
    """
    if any(k > rows for k in ks):
        raise ValueError(f"a comparison has K={max(ks)} completions, more than the {rows} rows of a packed batch")
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, k in enumerate(ks):
        if current and (used + k > rows or len(current) == max_prompts):
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += k
    if current:
        batches.append(current)
    return batches


def pack_comparisons(
    ks: Sequence[int],
    encode: Callable[[int], dict[str, np.ndarray]],
    rows: int,
    groups: int,
    k_max: int,
    seq_len: int,
    block: tuple[int, int] = (0, 1),
) -> dict[str, np.ndarray]:
    """One packed batch (module docstring) of the prompts ``0..len(ks)-1``: prompt g's ``ks[g]`` completions
    are rows ``o_g .. o_g + ks[g] - 1``, ``o_g = Σ_{i<g} ks[i]``, and ``slots[g, k] = o_g + k`` (0 where k ≥
    ks[g], masked by ``valid`` and ``pair_mask``). Rows past ``Σ ks`` and prompts past ``len(ks)`` are padding
    (zero tokens and mask, ``row_valid = 0``).

    ``encode(g)`` is prompt g's padded element (``encode_comparison``); only the prompts with a row or a slot
    in this process's ``block`` (``(i, n)``: the i-th of n equal blocks of both the rows and the slots) are
    encoded. Slots hold global row indices, so the blocks of every process make up the one-process batch.
    """
    if sum(ks) > rows or len(ks) > groups:
        raise ValueError(f"{len(ks)} prompts with {sum(ks)} completions do not fit {groups} slots and {rows} rows")
    row_block, local_rows = _process_rows(rows, block)
    group_block, local_groups = _process_rows(groups, block)
    offsets = np.concatenate([[0], np.cumsum(ks, dtype=np.int64)]).astype(np.int32)
    encode = functools.cache(encode)  # a prompt can own rows of this block and also its slot
    out = {
        "tokens": np.zeros((local_rows, seq_len), np.int32),
        "mask": np.zeros((local_rows, seq_len), np.int32),
        "slots": np.zeros((local_groups, k_max), np.int32),
        "valid": np.zeros((local_groups, k_max), np.int32),
        "pair_mask": np.zeros((local_groups, k_max, k_max), np.int32),
        "row_valid": np.zeros((local_groups,), np.int32),
    }
    for local, row in enumerate(range(row_block.start, row_block.stop)):
        g = int(np.searchsorted(offsets, row, side="right")) - 1
        if g >= len(ks):
            break  # padding from here on
        element = encode(g)
        out["tokens"][local] = element["tokens"][row - offsets[g]]
        out["mask"][local] = element["mask"][row - offsets[g]]
    for local, g in enumerate(range(group_block.start, min(group_block.stop, len(ks)))):
        element = encode(g)
        out["slots"][local, : ks[g]] = offsets[g] + np.arange(ks[g])
        out["valid"][local] = element["valid"]
        out["pair_mask"][local] = element["pair_mask"]
        out["row_valid"][local] = 1
    return out


class PackedPlan:
    """The batches of a packed pipeline (``packed_plan``) as a sequence: item n is the list of record indices
    ``pack_plan`` puts in batch n; ``rows``, ``groups`` and ``k_max`` are the batch's sizes. Each epoch is packed
    on its own from the record order of ``order`` (the padded pipeline's shuffled, repeated ids), so a batch
    never straddles two epochs. Epochs are packed when first asked for (grain reads from several threads, hence
    the lock); the batches are a pure function of the seed, so grain's saved index resumes them exactly."""

    def __init__(
        self, order: grain.MapDataset, ks: Sequence[int], rows: int, groups: int, k_max: int, num_epochs: int | None
    ):
        self._order, self.ks, self.rows, self.groups, self.k_max = order, list(ks), rows, groups, k_max
        self._num_epochs = num_epochs
        self._starts = [0]  # the first batch of each epoch packed so far, and one past the last
        self._epochs: dict[int, list[list[int]]] = {}  # the last few epochs' batches
        self._lock = threading.Lock()

    def _epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            n = len(self.ks)
            ids = [self._order[e * n + i] for i in range(n)]
            plan = pack_plan([self.ks[r] for r in ids], self.rows, self.groups)
            self._epochs[e] = [[ids[i] for i in batch] for batch in plan]
            if len(self._epochs) > 2:  # an infinite stream must not keep every epoch's batches: drop the oldest made
                del self._epochs[next(iter(self._epochs))]
        return self._epochs[e]

    def _count_epochs(self, epochs: int) -> None:
        """Extend ``_starts`` through the first ``epochs`` epochs (under the lock)."""
        while len(self._starts) <= epochs:
            self._starts.append(self._starts[-1] + len(self._epoch(len(self._starts) - 1)))

    def _batch(self, index: int) -> list[int]:
        with self._lock:
            while self._starts[-1] <= index:
                self._count_epochs(len(self._starts))
            e = int(np.searchsorted(self._starts, index, side="right")) - 1
            return self._epoch(e)[index - self._starts[e]]

    def __len__(self) -> int:
        if self._num_epochs is None:
            return sys.maxsize  # as grain's repeat(None)
        with self._lock:
            self._count_epochs(self._num_epochs)
            return self._starts[self._num_epochs]

    def __getitem__(self, index: int) -> list[int]:
        return self._batch(index)

    def epoch_batches(self, epoch: int) -> int:
        """How many batches epoch ``epoch`` (from 0) packs into: the steps of that epoch."""
        with self._lock:
            return len(self._epoch(epoch))


def _process_rows(batch_size: int, shard: tuple[int, int] | None) -> tuple[slice, int]:
    """This process's rows of every global batch: block ``i`` of ``n`` contiguous ``batch_size / n`` blocks,
    ``shard = (i, n)`` from ``sharding.batch_block`` (how ``sharding.to_global`` lays the blocks out). None
    is one process; with several, the block depends on the mesh, so it must be given."""
    if shard is None:
        import jax

        if jax.process_count() > 1:
            raise ValueError("on several processes the data pipeline needs shard=sharding.batch_block(mesh, rules)")
        shard = (0, 1)
    index, count = shard
    if batch_size % count:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {count} blocks of rows the processes feed")
    rows = batch_size // count
    return slice(index * rows, (index + 1) * rows), rows


def _records(source: Any, seed: int, shuffle: bool, num_epochs: int | None) -> grain.MapDataset:
    """The global record order: the same on every process (a pure function of the seed)."""
    ds = grain.MapDataset.source(source)
    if len(ds) == 0:
        raise ValueError("the dataset has no records")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


def _batched(
    ds: grain.MapDataset,
    encode: Callable[[Any], dict],
    batch_size: int,
    num_epochs: int | None,
    shard: tuple[int, int] | None,
    threads: int,
) -> grain.IterDataset:
    """Global batches of records -> this process's rows, encoded and stacked. Every process walks the same
    record stream and encodes only its own rows, so the global batch is the one a single process would
    build: losses do not depend on the number of hosts."""
    rows, local = _process_rows(batch_size, shard)

    def take(records: list) -> dict[str, np.ndarray]:
        mine = [encode(r) for r in records[rows]]
        return _stack(local, mine, placeholder=None if mine else encode(records[0]))

    ds = ds.batch(batch_size, drop_remainder=num_epochs is None, batch_fn=list).map(take)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4))


def _pipeline(
    source: Any,
    kind: str,
    encode: Callable[[dict], dict],
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard: tuple[int, int] | None,
    threads: int,
) -> grain.IterDataset:
    records = _records(source, seed, shuffle, num_epochs)
    return _batched(records, lambda r: encode(decode(r, kind)), batch_size, num_epochs, shard, threads)


def sft_batches(
    source: Any,
    fmt: TextFormat,
    batch_size: int,
    seed: int,
    *,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard: tuple[int, int] | None = None,
    threads: int = 2,
) -> grain.IterDataset:
    """Demonstrations -> SFT batches (see the module docstring). ``num_epochs=None`` repeats forever."""
    encode = functools.partial(encode_demo, fmt=fmt)
    return _pipeline(source, "demos", encode, batch_size, seed, shuffle, num_epochs, shard, threads)


def prompt_batches(
    source: Any,
    fmt: TextFormat,
    batch_size: int,
    seed: int,
    *,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard: tuple[int, int] | None = None,
    threads: int = 2,
) -> grain.IterDataset:
    """Prompts -> left-padded generation batches."""
    encode = functools.partial(encode_prompt, fmt=fmt)
    return _pipeline(source, "prompts", encode, batch_size, seed, shuffle, num_epochs, shard, threads)


def comparison_batches(
    source: Any,
    fmt: TextFormat,
    batch_size: int,
    seed: int,
    *,
    k_max: int = formats.MAX_K,
    pairs_as_examples: bool = False,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard: tuple[int, int] | None = None,
    threads: int = 2,
) -> grain.IterDataset:
    """Comparisons -> RM batches, all K completions of a prompt together (or one pair per element)."""
    if not pairs_as_examples:
        encode = functools.partial(encode_comparison, fmt=fmt, k_max=k_max)
        return _pipeline(source, "comparisons", encode, batch_size, seed, shuffle, num_epochs, shard, threads)
    # Shuffled pairs: index every (record, winner, loser) once, then shuffle the pairs across the dataset.
    index = []
    for i in range(len(source)):
        for winner, loser in formats.ranking_pairs(decode(source[i], "comparisons")["ranking"]):
            index.append((i, winner, loser))

    def encode_pair(entry):
        i, winner, loser = entry
        row = decode(source[i], "comparisons")
        pair = {
            "prompt": row["prompt"],
            "completions": [row["completions"][winner], row["completions"][loser]],
            "ranking": [[0], [1]],
        }
        return encode_comparison(pair, fmt, k_max=2)

    return _batched(_records(index, seed, shuffle, num_epochs), encode_pair, batch_size, num_epochs, shard, threads)


def packed_plan(
    source: Any,
    rows: int,
    seed: int,
    *,
    groups: int = 0,
    k_max: int = formats.MAX_K,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> PackedPlan:
    """Which comparisons each packed batch of ``rows`` completion rows and ``groups`` prompt slots holds
    (``PackedPlan``); ``groups = 0`` takes ``rows // 2``, room for any mix (K ≥ 2). Every comparison of an epoch
    is in exactly one batch, in ``comparison_batches``' record order for the same seed. Reads the K of every
    record once."""
    ks = [len(decode(source[i], "comparisons")["completions"]) for i in range(len(source))]
    if ks and max(ks) > k_max:
        raise ValueError(f"comparison with K={max(ks)} completions exceeds k_max={k_max} (raise data.k_max)")
    if ks and max(ks) > rows:
        raise ValueError(f"comparison with K={max(ks)} completions does not fit a packed batch of {rows} rows")
    order = _records(list(range(len(source))), seed, shuffle, None)
    return PackedPlan(order, ks, rows, groups or rows // formats.MIN_K, k_max, num_epochs)


def packed_comparison_batches(
    source: Any,
    fmt: TextFormat,
    plan: PackedPlan,
    *,
    shard: tuple[int, int] | None = None,
    threads: int = 2,
) -> grain.IterDataset:
    """Comparisons -> packed RM batches (module docstring), the batches of ``plan`` (``packed_plan`` of this
    ``source``). ``plan.rows`` and ``plan.groups`` are global sizes: each process encodes its block of both
    (``shard``)."""
    for size in (plan.rows, plan.groups):
        _process_rows(size, shard)  # both split evenly over the processes, or an error
    block = shard or (0, 1)

    def take(records: list[int]) -> dict[str, np.ndarray]:
        encode = lambda g: encode_comparison(decode(source[records[g]], "comparisons"), fmt, plan.k_max)
        ks = [plan.ks[r] for r in records]
        return pack_comparisons(ks, encode, plan.rows, plan.groups, plan.k_max, fmt.max_len, block)

    ds = grain.MapDataset.source(plan).map(take)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4))


def pretrain_batches(
    source: Any,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    *,
    counter: _Counter | None = None,
    shard: tuple[int, int] | None = None,
    threads: int = 2,
) -> grain.IterDataset:
    """Pretraining text -> rows of ``seq_len`` tokens packed first-fit with segment ids, forever."""
    counter = counter or _Counter()

    def encode(record):
        # A document is all "response": a long one keeps its beginning (and loses its EOS).
        text = decode(record, "pretrain")["text"]
        _, ids = counter.truncate([], tokenizer.encode(text) + [tokenizer.eos_id], seq_len, min_prompt_tokens=0)
        return {"inputs": np.asarray(ids, np.int32)}

    # Which documents share a row depends on the rows before it, so every process packs the whole global
    # stream (tokenizing every document) and keeps its own rows.
    rows, _ = _process_rows(batch_size, shard)
    ds = _records(source, seed, True, None).map(encode).to_iter_dataset(grain.ReadOptions(num_threads=threads))
    packed = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"inputs": seq_len}, num_packing_bins=batch_size, seed=seed
    )

    def to_batch(b):
        segments = b["inputs_segment_ids"].astype(np.int32)
        mask = (segments > 0).astype(np.int32)
        return {
            "tokens": b["inputs"].astype(np.int32),
            "segment_ids": segments,
            "mask": mask,
            "loss_mask": mask * (b["inputs_positions"] > 0),
            "row_valid": np.ones((segments.shape[0],), np.int32),
        }

    return packed.batch(batch_size, drop_remainder=True).map(lambda b: to_batch({k: v[rows] for k, v in b.items()}))

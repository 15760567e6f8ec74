"""Packed reward-model batches (``pipeline.packed_comparison_batches``): same loss and gradient as the padded
batches, under 10% padding on mixed K, sharded, every comparison once per epoch, resumable."""

import collections
import json
import random

import jax
import numpy as np
import pytest
from conftest import load_config
from flax import linen as nn

from instructjax import sharding, train_rm
from instructjax.data import formats, pipeline
from instructjax.data.tfds_builder import decode
from instructjax.metrics import read_metrics
from instructjax.model import ModelConfig, Transformer
from instructjax.tokenizer import Tokenizer

VOCAB, MAX_LEN = 512, 24


def number_tokenizer() -> Tokenizer:
    """Text is space-separated token ids (PAD 0, EOS 1), so a test can read a row back."""
    return Tokenizer(
        "hf", VOCAB, 0, 1, None, lambda t: [int(w) for w in t.split()], lambda ids: " ".join(map(str, ids))
    )


def mixed_k_records(n: int, seed: int = 0, ties: bool = True) -> list[dict]:
    """``n`` stored comparison records with K uniform in 2..9, some rankings with ties. Record i's prompt is the
    one token ``10 + i`` (so a row's first token names its record) and its completions are 1-12 random tokens."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        k = rng.randint(2, 9)
        completions = [" ".join(str(rng.randrange(10, VOCAB)) for _ in range(rng.randint(1, 12))) for _ in range(k)]
        order = list(range(k))
        rng.shuffle(order)
        ranking = [[c] for c in order]
        if ties and k > 2 and rng.random() < 0.3:  # tie the first two levels
            ranking = [ranking[0] + ranking[1], *ranking[2:]]
        records.append({"prompt": str(10 + i), "completions": completions, "ranking": json.dumps(ranking)})
    return records


@pytest.fixture(scope="module")
def fmt():
    return pipeline.TextFormat(number_tokenizer(), max_len=MAX_LEN, max_prompt_len=8)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=MAX_LEN, head="scalar")
    return Transformer(cfg)


def padded_and_packed(records, fmt, rows, groups):
    """The padded batch of ``records`` (``comparison_batches``' layout, one padding prompt after them) and the
    packed batch of the same prompts."""
    elements = [pipeline.encode_comparison(decode(r, "comparisons"), fmt, 9) for r in records]
    padded = pipeline._stack(len(elements) + 1, elements)
    ks = [int(e["valid"].sum()) for e in elements]
    packed = pipeline.pack_comparisons(ks, lambda g: elements[g], rows, groups, 9, fmt.max_len)
    return padded, packed


def random_params(model, seed):
    params = nn.unbox(model.init(jax.random.key(seed), np.zeros((1, MAX_LEN), np.int32))["params"])
    # a score head far from 0, so rewards differ and the loss and gradient are not near-constant
    params["score_head"]["kernel"] = params["score_head"]["kernel"] * 30
    return params


def loss_and_grad(model, params, batch):
    fn = jax.jit(jax.value_and_grad(train_rm.make_loss_fn(model), has_aux=True), static_argnums=2)
    (loss, metrics), grads = fn(params, batch, None)
    return float(loss), jax.tree.map(np.asarray, metrics), jax.tree.map(np.asarray, grads)


def assert_same_loss(a, b):
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    for key in ("accuracy", "prompts", "pairs", "completions", "reward_sum", "reward_sq_sum", "real_tokens"):
        np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    scale = max(float(np.abs(y).max()) for y in jax.tree.leaves(grads_b))
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        # float32 sums in another order: to 1e-6 of the largest gradient entry (some entries are 0 up to rounding)
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * scale)


def test_pack_plan_keeps_the_order_and_cuts_only_when_the_next_prompt_does_not_fit():
    ks = [9, 2, 3, 9, 9, 2, 2, 2, 2, 5]
    plan = pipeline.pack_plan(ks, rows=16, max_prompts=8)
    assert plan == [[0, 1, 2], [3], [4, 5, 6, 7], [8, 9]]
    assert [i for batch in plan for i in batch] == list(range(len(ks)))
    assert pipeline.pack_plan([2] * 10, rows=16, max_prompts=3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    with pytest.raises(ValueError, match="K=9 completions, more than the 8 rows"):
        pipeline.pack_plan([2, 9], rows=8, max_prompts=4)


def test_packed_loss_and_gradient_equal_the_padded_ones_on_mixed_k(model, fmt):
    records = mixed_k_records(12, seed=1)
    padded, packed = padded_and_packed(records, fmt, rows=80, groups=16)
    assert packed["tokens"].shape == (80, MAX_LEN) and padded["tokens"].shape == (13, 9, MAX_LEN)
    assert {len(r["completions"]) for r in records} >= {2, 9}  # the mix reaches both ends
    params = random_params(model, 0)
    padded_out, packed_out = loss_and_grad(model, params, padded), loss_and_grad(model, params, packed)
    assert_same_loss(padded_out, packed_out)
    assert packed_out[1]["computed_completions"] == 80 and padded_out[1]["computed_completions"] == 13 * 9
    assert padded_out[1]["prompts"] == 12 and padded_out[0] > 0.1


def test_packed_batches_shard_over_8_devices_and_process_blocks(model, fmt):
    records = mixed_k_records(10, seed=2)
    rows, divisor = 64, 8
    groups = train_rm.packed_groups(rows, divisor)
    assert groups == 32
    padded, packed = padded_and_packed(records, fmt, rows, groups)
    params = random_params(model, 1)
    reference = loss_and_grad(model, params, padded)

    for shape in ((8, 1, 1), (1, 4, 2), (2, 2, 2)):  # data parallel, fsdp × tensor, all three
        mesh, rules = sharding.make_mesh(shape), sharding.DEFAULT_RULES
        assert divisor % sharding.batch_divisor(mesh, rules) == 0
        _, shardings = sharding.model_shardings(model, mesh, rules)
        with sharding.use(mesh, rules):
            sharded = loss_and_grad(model, jax.device_put(params, shardings), sharding.to_global(packed, mesh, rules))
        assert_same_loss(reference, sharded)

    # several processes: each packs its block of the rows and of the slots; together they are the one batch
    elements = [pipeline.encode_comparison(decode(r, "comparisons"), fmt, 9) for r in records]
    ks = [len(r["completions"]) for r in records]
    for n in (2, 4, 8):
        blocks = [
            pipeline.pack_comparisons(ks, lambda g: elements[g], rows, groups, 9, MAX_LEN, (i, n)) for i in range(n)
        ]
        for key, value in packed.items():
            np.testing.assert_array_equal(np.concatenate([b[key] for b in blocks]), value, err_msg=f"{key}, {n}")


def test_padding_is_at_most_10_percent_on_k_from_2_to_9(fmt):
    source = mixed_k_records(600, seed=3)
    ks = [len(r["completions"]) for r in source]
    assert set(ks) == set(range(2, 10))
    plan = pipeline.packed_plan(source, rows=64, seed=0, num_epochs=1)
    padded_fraction = 1 - sum(ks) / (len(source) * 9)  # every prompt padded to k_max = 9
    batches = list(pipeline.packed_comparison_batches(source, fmt, plan))
    assert len(batches) == len(plan) == plan.epoch_batches(0)
    computed = sum(b["tokens"].shape[0] for b in batches)
    real = sum(int(b["valid"].sum()) for b in batches)
    assert real == sum(ks) == sum(int((b["mask"].sum(axis=1) > 0).sum()) for b in batches)
    packed_fraction = 1 - real / computed
    assert packed_fraction <= 0.10 and padded_fraction > 0.35, (packed_fraction, padded_fraction)


def record_ids(batch) -> list[int]:
    """The records of a packed batch's prompts, in slot order, read from their rows' first (prompt) token."""
    ids = []
    for g in np.flatnonzero(batch["row_valid"]):
        first = {int(batch["tokens"][row, 0]) for row in batch["slots"][g, : int(batch["valid"][g].sum())]}
        assert len(first) == 1  # all of a prompt's slots point at its own rows
        ids.append(first.pop() - 10)
    return ids


def test_every_comparison_is_seen_once_per_epoch_in_the_padded_order(fmt):
    source = mixed_k_records(50, seed=4)
    plan = pipeline.packed_plan(source, rows=32, seed=7, num_epochs=None)
    it = iter(pipeline.packed_comparison_batches(source, fmt, plan))
    padded = iter(pipeline.comparison_batches(source, fmt, batch_size=50, seed=7, num_epochs=None))
    for epoch in range(3):
        seen = []
        for _ in range(plan.epoch_batches(epoch)):
            seen += record_ids(next(it))
        assert collections.Counter(seen) == collections.Counter(range(50)), epoch
        # the same shuffled order as the padded pipeline's epoch (its batch of 50 is the whole epoch)
        assert seen == [int(t) - 10 for t in next(padded)["tokens"][:, 0, 0]], epoch
    finite = list(pipeline.packed_comparison_batches(source, fmt, pipeline.packed_plan(source, 32, 7, num_epochs=2)))
    assert len(finite) == plan.epoch_batches(0) + plan.epoch_batches(1)
    assert sorted(i for b in finite for i in record_ids(b)) == sorted(list(range(50)) * 2)


def test_packed_iterator_resumes_exactly(fmt):
    source = mixed_k_records(40, seed=5)
    plan = lambda: pipeline.packed_plan(source, rows=24, seed=1)
    it = iter(pipeline.packed_comparison_batches(source, fmt, plan()))
    for _ in range(9):  # past the first epoch
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = iter(pipeline.packed_comparison_batches(source, fmt, plan()))
    resumed.set_state(state)
    for a, b in zip(expected, (next(resumed) for _ in range(4)), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_packed_config_errors(tmp_path):
    config = load_config("configs/rm.py", "tiny")
    for overrides, message in (
        ({"data.pack_rows": -1}, "pack_rows=-1"),
        ({"data.pack_rows": 4}, "pack_rows=4 < config.data.k_max=9"),
        ({"data.pack_rows": 64, "data.pairs_as_examples": True}, "pairs are never padded"),
    ):
        c = load_config("configs/rm.py", "tiny")
        c.update_from_flattened_dict(overrides)
        with pytest.raises(ValueError, match=message):
            train_rm.check_config(c)
    train_rm.check_config(config)
    assert config.data.pack_rows == 0  # padded stays the default
    with pytest.raises(ValueError, match="does not fit a packed batch of 8 rows"):
        pipeline.packed_plan(mixed_k_records(30), rows=8, seed=0)


@pytest.mark.slow
def test_packed_rm_trains_and_fsdp4_tensor2_matches_one_device(small_world, sft_dir, tmp_path, monkeypatch):
    """train_rm with data.pack_rows on the small world: an epoch is the plan's batches, and 4 steps on
    fsdp4×tensor2 log the losses of 1 device."""
    real_make_mesh = sharding.make_mesh

    def run(shape, **overrides):
        if shape == (1, 1, 1):
            monkeypatch.setattr(sharding, "make_mesh", lambda s: real_make_mesh(s, devices=jax.devices()[:1]))
        config = load_config("configs/rm.py", "tiny")
        config.data.world_dir, config.init_from = str(small_world), str(sft_dir)
        settings = {"data.pack_rows": 48, "batch_size": 8, "log_every": 1, "eval_every": 100, "mesh_shape": shape}
        config.update_from_flattened_dict({**settings, **overrides})
        summary = train_rm.train(config, tmp_path / str(shape))
        monkeypatch.setattr(sharding, "make_mesh", real_make_mesh)
        rows = [r for r in read_metrics(tmp_path / str(shape)) if "tokens_per_s" in r]
        return summary, rows

    summary, rows = run((1, 4, 2), num_steps=0, num_epochs=1.0)
    rankings, _ = formats.read_jsonl(small_world / "comparisons_train.jsonl", "comparisons")
    ks = [len(r["completions"]) for r in rankings]
    assert summary["status"] == "done" and len(rows) == summary["step"]
    assert sum(r["completions"] for r in rows) == sum(ks)  # the epoch: every comparison once
    assert sum(r["prompts"] for r in rows) == len(ks)
    assert all(r["computed_completions"] == 48 for r in rows)
    one = [r["loss"] for r in run((1, 1, 1), num_steps=len(rows))[1]]
    np.testing.assert_allclose([r["loss"] for r in rows], one, atol=1e-5, rtol=0)

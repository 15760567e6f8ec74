"""Mesh construction, rule coverage errors, and the golden sharding dump of the tiny models."""

import json
import os
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import load_config

from instructjax import sharding
from instructjax.model import ModelConfig, Transformer

GOLDEN = pathlib.Path(__file__).parent / "golden"


def test_mesh_fill_and_mismatch_errors():
    assert sharding.make_mesh((1, -1, 2)).shape == {"data": 1, "fsdp": 4, "tensor": 2}
    assert sharding.make_mesh((2, 2, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 12 devices but 8 are available"):
        sharding.make_mesh((3, 2, 2))
    with pytest.raises(ValueError, match="not a multiple of 3"):
        sharding.make_mesh((3, -1, 1))
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh((-1, -1, 1))
    with pytest.raises(ValueError, match="3 entries"):
        sharding.make_mesh((8,))
    assert sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]).devices.size == 1


def test_missing_rule_is_an_error_naming_the_parameter():
    model = Transformer(ModelConfig.from_dict(load_config("configs/model.py", "tiny").model))
    rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "mlp")
    with pytest.raises(ValueError, match=r"parameter layers_0/mlp/wi/(bias|kernel): logical axis 'mlp' has no rule"):
        sharding.init_params(model, jax.random.key(0), np.zeros((1, 4), np.int32), sharding.make_mesh((1, 8, 1)), rules)


def test_unannotated_parameter_is_an_error():
    class Bare(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="proj")(x)

    with pytest.raises(ValueError, match=r"parameter proj/(bias|kernel) has no logical axis names"):
        sharding.init_params(
            Bare(), jax.random.key(0), np.zeros((2, 4)), sharding.make_mesh((1, 8, 1)), sharding.DEFAULT_RULES
        )


def test_uneven_split_is_an_error_naming_the_dimension():
    cfg = load_config("configs/model.py", "tiny").model.to_dict()
    model = Transformer(ModelConfig.from_dict({**cfg, "vocab_size": 511}))
    with pytest.raises(ValueError, match=r"embed/embedding: dimension 0 \('vocab', size 511\)"):
        sharding.init_params(
            model, jax.random.key(0), np.zeros((1, 4), np.int32), sharding.make_mesh((1, 4, 2)), sharding.DEFAULT_RULES
        )


def test_host_local_batch_becomes_a_global_array_split_over_data_and_fsdp():
    mesh = sharding.make_mesh((2, 2, 2))
    local = np.arange(8 * 3).reshape(8, 3)
    arr = sharding.to_global(local, mesh, sharding.DEFAULT_RULES)
    assert arr.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert {s.data.shape for s in arr.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(arr), local)


def test_processes_that_share_a_batch_shard_feed_the_same_block_of_rows():
    # 4 hosts of 2 devices with a tensor axis of 4 (as mesh (1, 8, 8) on 4-chip v5e hosts): every batch shard
    # spans 2 hosts, so the batch splits into 2 blocks, each fed by the 2 hosts that hold it.
    mesh = sharding.make_mesh((1, 2, 4))
    held: dict[int, set[int]] = {}
    for device, (rows,) in sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, 1).devices_indices_map((2,)).items():
        held.setdefault(device.id // 2, set()).add(rows.start)
    blocks = sharding.batch_blocks(held, 2)
    assert sorted(blocks.values()) == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert len({blocks[p] for p in (0, 1)}) == 1  # the hosts of one tensor group feed the same rows
    # every host its own shards: a block each, in shard order
    assert sharding.batch_blocks({1: {2, 3}, 0: {0, 1}}, 4) == {0: (0, 2), 1: (1, 2)}
    assert sharding.batch_block(mesh, sharding.DEFAULT_RULES) == (0, 1)  # this single process
    with pytest.raises(ValueError, match="not equal contiguous blocks"):
        sharding.batch_blocks({0: {0, 2}, 1: {1, 3}}, 4)
    with pytest.raises(ValueError, match="not equal contiguous blocks"):
        sharding.batch_blocks({0: {0}, 1: {1, 2}}, 3)


@pytest.mark.parametrize("preset", ["tiny", "tiny_llama"])
def test_golden_parameter_shardings(preset):
    """A change in how the tiny models shard on (data=2, fsdp=2, tensor=2) shows up as a diff here.

    Regenerate after an intended change with ``UPDATE_GOLDEN=1 pytest tests/test_sharding.py``.
    """
    model = Transformer(ModelConfig.from_dict(load_config("configs/model.py", preset).model))
    mesh, rules = sharding.make_mesh((2, 2, 2)), sharding.DEFAULT_RULES
    tokens = np.zeros((1, 4), np.int32)
    with sharding.use(mesh, rules):
        abstract = sharding.abstract_params(model, tokens)
        shardings = sharding.logical_to_shardings(
            sharding.logical_axes(abstract), sharding.strip_boxes(abstract), mesh, rules
        )
    table = sharding.describe(shardings, sharding.strip_boxes(abstract))
    path = GOLDEN / f"{preset}_param_shardings.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    assert table == json.loads(path.read_text())

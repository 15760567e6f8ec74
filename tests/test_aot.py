"""Ahead-of-time compilation for a TPU slice on this CPU machine (``instructjax/aot.py``, ``aot_compiler.py``):
the tiny SFT, RM and PPO programs compile for v5e:2x2 with libtpu; the memory plan is positive and an
FSDP-sharded state takes a quarter per chip; bad topologies and a missing libtpu are clear errors; the TPU
presets name consistent slices.

CI installs only '.[test]' (no libtpu): the compiling tests skip there and run where '.[tpu]' is installed.
"""

import importlib.util
import math
import os

import ml_collections
import numpy as np
import pytest
from conftest import REPO, load_config, load_config_module

from instructjax import aot, aot_compiler, configlib
from instructjax.model import ModelConfig, Transformer, count_params
from instructjax.sharding import abstract_params

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
TOPOLOGY = "v5e:2x2"


@pytest.fixture(scope="module")
def topology():
    return aot_compiler.topology(TOPOLOGY)


def _check_positive(report):
    assert report["programs"]
    for p in report["programs"]:
        assert p.argument_bytes > 0 and p.output_bytes > 0 and p.code_bytes > 0, p
        assert p.temp_bytes >= 0 and p.alias_bytes >= 0 and p.total_bytes > 0, p
        assert p.flops > 0 and p.xla_flops > 0, p
        assert p.total_bytes < report["hbm_bytes_per_device"], p


@pytest.mark.slow
@needs_libtpu
def test_sft_step_argument_bytes_are_the_fsdp_sharded_state(topology):
    # The tiny SFT config with TPU-lane-wide shards (512 / 4 = 128), so tile padding does not blur the count.
    config = load_config("configs/sft.py", "tiny")
    config.model.update(dict(d_model=512, n_heads=4, d_ff=1024))
    config.batch_size = 8
    report = aot.compile_config(config, topology, "train_step")
    _check_positive(report)
    (step,) = report["programs"]
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    n = count_params(abstract_params(Transformer(ModelConfig.from_dict(config.model)), np.zeros((1, 8), np.int32)))
    state = n * (4 + 4 + 4) / 4  # f32 params + Adam's two moments, a quarter per chip
    assert 0.99 * state < step.argument_bytes < 1.05 * state, (step.argument_bytes, state)  # + batch, rng
    assert step.alias_bytes > 0.95 * state  # the donated state is updated in place
    # the matmul count holds the 6 N per token of a training step (plus attention and dropout-free extras)
    assert step.flops > 0.9 * step.model_flops


@pytest.mark.slow
@needs_libtpu
def test_tiny_rm_train_and_eval_steps_compile(topology):
    config = load_config("configs/rm.py", "tiny")
    config.batch_size = config.eval_batch_size = 8
    report = aot.compile_config(config, topology, "all")
    _check_positive(report)
    train, evaluate = report["programs"]
    assert (train.name, evaluate.name) == ("rm train_step", "rm eval_step")
    assert evaluate.resident_bytes > 0 and evaluate.alias_bytes == 0  # Adam state beside it; params not donated


@pytest.mark.slow
@needs_libtpu
def test_tiny_ppo_update_and_rollout_compile(topology):
    config = load_config("configs/ppo.py", "tiny_ptx")
    with config.unlocked():
        config.aot = ml_collections.ConfigDict()
        config.aot.policy_model = load_config("configs/sft.py", "tiny").model
        config.aot.value_model = load_config("configs/rm.py", "tiny").model
    report = aot.compile_config(config, topology, "all")
    _check_positive(report)
    names = [p.name for p in report["programs"]]
    assert names == ["ppo train_step (minibatch update)", "ppo rollout: generate", "ppo rollout: score"]
    update, generate, score = report["programs"]
    assert update.resident_bytes > 0 and generate.resident_bytes > update.resident_bytes  # frozen models; + Adam
    data = aot_compiler.report_dict(report)
    assert data["fits"] and all(p["headroom_bytes"] > 0 for p in data["programs"])
    assert "ppo train_step" in aot_compiler.format_table(report)


@needs_libtpu
def test_blocked_head_gathers_an_fsdp_sharded_weight_once_on_tpu(topology):
    """``scoring.token_logprobs`` under the training mesh and rules, compiled for v5e:2x2: the forward pass
    all-gathers the FSDP-sharded [V,D] head once (the XLA TPU compiler gathered it in each of the 16 blocks
    before), the gradient too, and the blocks count rows per chip (16 rows x 64 positions over 4 chips at
    ``block_rows`` 64: 4 blocks, not 16)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from instructjax import hlo_stats, scoring, sharding

    mesh = sharding.make_mesh((1, 4, 1), topology.devices)
    rules = sharding.as_rules(configlib.load_module(REPO / "configs/model.py").DEFAULT_RULES)
    b, n, d, v = 16, 64, 256, 4096
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    args = (
        jax.ShapeDtypeStruct((b, n, d), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((v, d), jnp.float32, sharding=NamedSharding(mesh, P("tensor", "fsdp"))),
        jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=rows),
    )

    def logprobs(h, w, y):
        return scoring.token_logprobs(h, w, y, 1.0, block_rows=64)

    def loss(h, w, y):
        logp, entropy = logprobs(h, w, y)
        return logp.astype(jnp.float32).sum() + 0.1 * entropy.sum()

    weight = v * d * 2  # gathered in bf16, the hidden's dtype
    with sharding.use(mesh, rules):
        blocks = jax.make_jaxpr(logprobs)(*args).eqns
        for fn in (logprobs, jax.grad(loss, argnums=(0, 1))):
            text = jax.jit(fn).lower(*args).compile().as_text()
            gathered = hlo_stats.program_stats(text).total().collectives.get("all-gather", 0.0)
            assert 0.9 * weight <= gathered <= 1.5 * weight, (fn, gathered, weight)
    trips = [e.params["length"] for e in blocks[0].params["call_jaxpr"].eqns if e.primitive.name == "scan"]
    assert trips == [4], trips


def test_unknown_topology_and_missing_libtpu_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown TPU topology 'tpu-v5e-16'"):
        aot_compiler.topology("tpu-v5e-16")
    with pytest.raises(ValueError, match="unknown TPU topology 'v9:2x2'"):
        aot_compiler.topology("v9:2x2")
    monkeypatch.setattr(aot_compiler.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[tpu\]'"):
        aot_compiler.topology("v5e:2x2")
    with pytest.raises(ValueError, match="stage 'sft' has no rollout"):
        aot.compile_config(load_config("configs/sft.py", "tiny"), "v5e:2x2", "rollout")


@needs_libtpu
def test_a_shape_libtpu_rejects_is_named():
    with pytest.raises(ValueError, match="libtpu rejects TPU topology 'v5e:3x3'"):
        aot_compiler.topology("v5e:3x3")


def test_tpu_presets_name_a_slice_their_mesh_fills():
    for name in load_config_module("configs/tpu.py").PRESETS:
        config = load_config("configs/tpu.py", name)
        family, shape = config.tpu_slice.split(":")
        assert family in aot_compiler.HBM_GIB_PER_CHIP
        assert math.prod(config.mesh_shape) == math.prod(int(s) for s in shape.split("x")), name
        assert config.model.scan_layers if "model" in config else config.aot.policy_model.scan_layers


@pytest.mark.slow
def test_train_state_with_gradient_accumulation_is_created_sharded_and_steps():
    # optax.MultiSteps holds an empty tuple (skip_state=()): the presets accumulate, so the state must shard.
    import jax

    from instructjax import optim, sharding, steps, train_sft

    config = load_config("configs/sft.py", "tiny")
    config.optim.grad_accum_steps = 2
    mesh, rules = sharding.make_mesh((1, 4, 2)), sharding.as_rules(config.rules)
    model = Transformer(ModelConfig.from_dict(config.model))
    tx = optim.make_optimizer(config.optim, 10)
    init = lambda r: model.init(r, np.zeros((1, 8), np.int32))["params"]
    state, state_sh = steps.create_train_state(init, tx, mesh, rules, seed=0)
    step = steps.make_train_step(
        train_sft.make_loss_fn(model, ModelConfig.from_dict(config.model), config), tx, state_sh
    )
    batch = {k: np.ones((8, 16), np.int32) for k in ("tokens", "mask", "loss_mask")}
    with sharding.use(mesh, rules):
        for _ in range(2):
            state, out = step(state, sharding.to_global(batch, mesh, rules))
    assert bool(out["finite"]) and int(state.opt_state.gradient_step) == 1
    assert jax.tree.structure(state) == jax.tree.structure(state_sh)


def test_sweep_tables_show_every_row_and_name_what_was_not_compiled():
    # scripts/aot_sweep.py renders docs/scaling.md's tables: a compiled row, a compiler crash, a missing row.
    sweep = configlib.load_module(REPO / "scripts/aot_sweep.py")
    presets = load_config_module("configs/tpu.py").PRESETS
    assert all(p in presets for p in sweep.PRESETS)
    gib = aot_compiler.GiB
    program = dict(
        name="sft train_step",
        argument_bytes=2 * gib,
        temp_bytes=10 * gib,
        resident_bytes=0,
        total_bytes=12 * gib,
        headroom_bytes=4 * gib,
        fits=True,
        flops=1.8e14,
        compile_seconds=60.0,
        error="",
    )
    compiled = {"topology": "v5e:2x2", "mesh": {"data": 1, "fsdp": 4, "tensor": 1}, "programs": [program]}
    crashed = {"failed": "segmentation fault", "compiled_before": [["ppo rollout: generate", "16.19"]]}
    text = sweep.tables({"preset:sft_1p3b": compiled, "smaller:ppo_ptx_1p3b": crashed})
    assert "| sft_1p3b | v5e:2x2 | (1, 4, 1) | sft train_step | 2.00 | 10.00 | 0.00 | 12.00 | 4.00 | yes |" in text
    assert "compiler crashed (segmentation fault) after: ppo rollout: generate 16.19 GiB" in text
    assert text.count("not compiled") == len(sweep.ROWS) - 2
    assert all(line.count("|") == 13 for line in text.splitlines() if line.startswith("|"))


def test_tpu_flags_are_added_to_libtpu_init_args_and_the_users_own_values_kept(monkeypatch):
    from instructjax import sharding

    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_windowed_einsum_for_all_gather=true --foo=1")
    sharding.set_tpu_flags()
    args = os.environ["LIBTPU_INIT_ARGS"].split()
    assert args[:2] == ["--xla_tpu_enable_windowed_einsum_for_all_gather=true", "--foo=1"]
    assert args[2:] == ["--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"]
    sharding.set_tpu_flags()  # idempotent
    assert os.environ["LIBTPU_INIT_ARGS"].split() == args
    monkeypatch.delenv("LIBTPU_INIT_ARGS")
    sharding.set_tpu_flags()
    assert os.environ["LIBTPU_INIT_ARGS"].split() == [f"--{k}={v}" for k, v in sharding.TPU_FLAGS.items()]

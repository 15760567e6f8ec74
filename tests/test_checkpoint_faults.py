"""Checkpoints at the edges: a damaged latest step (resume and ``load_params`` fall back to the newest intact
one, saying which step they skipped and why), every step damaged (a clear error), a save that cannot complete
(a clear error; the previous step still resumes exactly).

Damage is done to the files of a real save: truncated array data, a deleted item directory, corrupt ``meta``
JSON, a deleted item ``_METADATA``, a truncated iterator state. A full disk is simulated (tests run as root,
where a read-only directory does not stop writes) by making orbax's JSON writer raise ``OSError(ENOSPC)`` for
one step: it runs in the background commit, after the arrays of that step were written to its temporary
directory, which is where a real full disk fails an asynchronous save.
"""

import errno
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import load_config

from instructjax import checkpoint, steps, train_sft
from instructjax.checkpoint import CheckpointError

# ----------------------------------------------------------------- a small state, saved directly


def tiny_state(step):
    return steps.TrainState(
        step=jnp.asarray(step, jnp.int32),
        params={"w": jnp.full((4, 3), float(step))},
        opt_state={"mu": jnp.full((4, 3), -float(step))},
        rng=jnp.arange(2, dtype=jnp.uint32),
        skipped_steps=jnp.zeros((), jnp.int32),
    )


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def new_iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def save_steps(workdir, steps_to_save=(2, 4, 6)):
    """Checkpoints at ``steps_to_save``; the iterators ``a`` and ``b`` advance 1 and 2 elements per step."""
    a, b = new_iterator(), new_iterator()
    ckpt = checkpoint.Checkpointer(workdir, keep=len(steps_to_save))
    previous = 0
    for step in steps_to_save:
        for _ in range(step - previous):
            next(a), next(b), next(b)
        previous = step
        ckpt.save(tiny_state(step), {"a": a, "b": b}, {"step": step})
    ckpt.save_best(tiny_state(steps_to_save[-1]).params, steps_to_save[-1])
    ckpt.close()


def restore(workdir):
    """``(step, params w, meta, iterator a's next index, b's)`` of ``Checkpointer.restore``."""
    like = tiny_state(0)
    a, b = new_iterator(), new_iterator()
    state, meta = checkpoint.Checkpointer(workdir).restore(like, shardings_of(like), {"a": a, "b": b})
    return (
        int(state.step),
        float(state.params["w"][0, 0]),
        meta,
        a.get_state()["next_index"],
        b.get_state()["next_index"],
    )


def truncate(path, size=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def truncate_arrays(step_dir):
    for path in step_dir.glob("params/**/d/*"):  # the array data files of the OCDBT store
        truncate(path)


DAMAGES = {
    # name: (damage the step's directory, the exception class the skip line names)
    "truncated array files": (truncate_arrays, "ValueError"),
    "train item deleted": (lambda d: shutil.rmtree(d / "train"), "KeyError"),
    "meta JSON corrupt": (lambda d: (d / "meta" / "metadata").write_text('{"step": '), "JSONDecodeError"),
    "meta zero bytes": (lambda d: truncate(d / "meta" / "metadata", 0), "JSONDecodeError"),
    "train _METADATA deleted": (lambda d: (d / "train" / "_METADATA").unlink(), "ValueError"),
    "params manifest zero bytes": (lambda d: truncate(d / "params" / "manifest.ocdbt", 0), "ValueError"),
    "iterator state truncated": (lambda d: truncate(d / "data_b" / "process_0-of-1.json"), "JSONDecodeError"),
    "step directory emptied": (lambda d: [shutil.rmtree(p) for p in d.iterdir() if p.is_dir()], "KeyError"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_restore_skips_a_damaged_latest_step(tmp_path, capsys, damage):
    save_steps(tmp_path)
    damage_fn, error_class = DAMAGES[damage]
    damage_fn(tmp_path / "checkpoints" / "6")
    capsys.readouterr()
    # step 4 entirely: state, meta and both iterators (one may be set from step 6 before the other's item fails)
    assert restore(tmp_path) == (4, 4.0, {"step": 4}, 4, 8)
    out = capsys.readouterr().out
    skip = f"checkpoint: skipping step 6 in {tmp_path / 'checkpoints'}: it cannot be restored ({error_class}: "
    assert skip in out and out.count("\n") == 1, out


def test_an_iterator_set_from_a_damaged_step_is_set_again_from_the_restored_one(tmp_path):
    save_steps(tmp_path)
    (tmp_path / "checkpoints" / "6" / "data_b" / "process_0-of-1.json").write_text('{"next_index": ')
    shutil.rmtree(tmp_path / "checkpoints" / "4" / "meta")
    # a may be set from step 6 (its item is intact) before b's fails; step 4's state fails before its iterators
    assert restore(tmp_path) == (2, 2.0, {"step": 2}, 2, 4)


def test_every_step_damaged_raises_naming_the_directory_and_each_reason(tmp_path):
    save_steps(tmp_path)
    ckpts = tmp_path / "checkpoints"
    shutil.rmtree(ckpts / "6" / "params")
    (ckpts / "4" / "meta" / "metadata").write_text("{")
    truncate_arrays(ckpts / "2")
    with pytest.raises(CheckpointError) as raised:
        restore(tmp_path)
    lines = str(raised.value).splitlines()
    assert lines[0] == f"no checkpoint in {ckpts} can be restored (tried newest first):"
    assert lines[1].startswith('  step 6: KeyError: Item "params" was not found in the checkpoint.')
    assert lines[2].startswith("  step 4: JSONDecodeError: Expecting property name")
    assert lines[3].startswith("  step 2: ValueError: OUT_OF_RANGE: Error reading ") and len(lines) == 4


def test_load_params_falls_back_the_same_way(tmp_path, capsys):
    save_steps(tmp_path)
    like = tiny_state(0).params
    load = lambda **kw: float(checkpoint.load_params(tmp_path, like, shardings_of(like), **kw)["w"][0, 0])
    (tmp_path / "checkpoints" / "6" / "meta" / "metadata").write_text("{")
    assert load() == 6.0  # the hand-off reads params alone: a damaged meta does not matter
    truncate_arrays(tmp_path / "checkpoints" / "6")
    capsys.readouterr()
    assert load() == 4.0
    assert f"checkpoint: skipping step 6 in {tmp_path / 'checkpoints'}: it cannot be restored (ValueError: " in (
        capsys.readouterr().out
    )
    truncate_arrays(tmp_path / "best" / "6")  # best/ keeps one step: nothing to fall back to
    with pytest.raises(CheckpointError, match=f"no checkpoint in {tmp_path / 'best'} can be restored"):
        load(best=True)


# ----------------------------------------------------------------- a save that cannot complete


def disk_full_at(monkeypatch, step_dir_name):
    """Orbax's JSON writer (the ``meta`` item) raises ENOSPC for the step written to ``<step_dir_name>.*``."""
    real_save = ocp.handlers.JsonCheckpointHandler._save_fn

    async def save(self, item, directory):
        if f"/{step_dir_name}." in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await real_save(self, item, directory)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", save)


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_save_names_step_directory_and_cause_and_keeps_the_previous_step(tmp_path, monkeypatch, async_save):
    disk_full_at(monkeypatch, "checkpoints/4")
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=async_save)
    it = new_iterator()
    expected = (
        rf"could not save step 4 in {tmp_path / 'checkpoints'} \(OSError: \[Errno 28\] No space left on device: "
        r".*\); the steps saved before it are untouched: a rerun resumes from step 2$"
    )
    with pytest.raises(CheckpointError, match=expected):
        for step in (2, 4, 6):  # an asynchronous write fails in the background: the next save says so
            ckpt.save(tiny_state(step), {"a": it}, {"step": step})
    ckpt.close()  # the failure was reported once
    monkeypatch.undo()
    like, a = tiny_state(0), new_iterator()
    state, meta = checkpoint.Checkpointer(tmp_path).restore(like, shardings_of(like), {"a": a})
    assert (int(state.step), meta) == (2, {"step": 2})


def test_the_failure_of_the_last_write_is_raised_by_close(tmp_path, monkeypatch):
    disk_full_at(monkeypatch, "checkpoints/2")
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(tiny_state(2), {}, {})
    with pytest.raises(CheckpointError, match=r"could not save step 2 .*no step was saved before it: a rerun starts"):
        ckpt.close()


# ----------------------------------------------------------------- whole runs: the same params as without the fault


def sft_config(world):
    config = load_config("configs/sft.py", "tiny")
    config.data.world_dir = str(world)
    config.update_from_flattened_dict(
        {"num_steps": 8, "log_every": 2, "eval_every": 4, "checkpoint_every": 2, "batch_size": 8}
    )
    return config


def final_params(config, workdir):
    import flax.linen as nn

    from instructjax.model import ModelConfig, Transformer

    model = Transformer(ModelConfig.from_dict(config.model))
    shapes = jax.eval_shape(lambda r: nn.unbox(model.init(r, np.zeros((1, 8), np.int32))["params"]), jax.random.key(0))
    return checkpoint.load_params(workdir, shapes, jax.tree.map(lambda _: None, shapes))


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(small_world, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    config = sft_config(small_world)
    train_sft.train(config, workdir)
    return config, final_params(config, workdir)


@pytest.mark.slow
# orbax closes its event loop at the first failed array read; the reads still in flight then find it closed
@pytest.mark.filterwarnings("ignore:Exception ignored:pytest.PytestUnraisableExceptionWarning")
def test_run_resumes_past_a_damaged_latest_checkpoint_and_finishes_identically(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    config, expected = uninterrupted
    real_check = steps.check_finite

    def crash_at_step_7(step, metrics):
        if step == 7:
            raise RuntimeError("simulated crash")
        real_check(step, metrics)

    monkeypatch.setattr(steps, "check_finite", crash_at_step_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sft.train(config, tmp_path)
    monkeypatch.setattr(steps, "check_finite", real_check)
    assert checkpoint.final_step(tmp_path) == 6
    truncate_arrays(tmp_path / "checkpoints" / "6")  # e.g. a node lost while the filesystem flushed step 6
    capsys.readouterr()
    assert train_sft.train(config, tmp_path)["step"] == 8
    out = capsys.readouterr().out
    assert f"checkpoint: skipping step 6 in {tmp_path / 'checkpoints'}: it cannot be restored (ValueError: " in out
    assert "[sft] resuming from step 4 of 8" in out
    assert_same_params(final_params(config, tmp_path), expected)


@pytest.mark.slow
def test_run_whose_save_fails_stops_naming_it_and_a_rerun_finishes_identically(uninterrupted, tmp_path, monkeypatch):
    config, expected = uninterrupted
    disk_full_at(monkeypatch, "checkpoints/6")
    with pytest.raises(CheckpointError, match=rf"could not save step 6 in {tmp_path / 'checkpoints'} \(OSError: "):
        train_sft.train(config, tmp_path)
    monkeypatch.undo()
    assert checkpoint.final_step(tmp_path) == 4
    assert train_sft.train(config, tmp_path)["step"] == 8  # the space is back: resume from step 4
    assert_same_params(final_params(config, tmp_path), expected)

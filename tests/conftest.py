"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib
import shutil
import tempfile

# One persistent XLA compilation cache for the test run: the xdist workers, the children of the kill,
# resume and multi-host tests, and the notebook's kernel compile many of the same programs (the same
# tiny models on the same meshes), and a cache hit skips XLA's compile, never the tracing or the run.
# The controller makes it (the workers and the children inherit the variable) and removes it at the
# end, so every run starts cold; set JAX_COMPILATION_CACHE_DIR yourself to keep one across runs.
# A size limit turns on jax's file lock, so concurrent writers cannot hand a reader a partial entry.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="instructjax-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

from instructjax import configlib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config_module(path: str):
    """Import ``configs/<file>.py`` by path, as ``config_flags`` does."""
    return configlib.load_module(REPO / path)


def load_config(path: str, arg: str | None = None):
    """``get_config(arg)`` of a config file."""
    return configlib.load_config(f"{REPO / path}:{arg or ''}")


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set too late?)"


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small synthetic world (a few hundred rows per file), written once per test session."""
    from instructjax.data import world

    out = tmp_path_factory.mktemp("world")
    sizes = world.WorldSizes(
        pretrain_train=300,
        pretrain_heldout=20,
        demos_train=100,
        demos_valid=20,
        comparisons_train=40,
        comparisons_valid=10,
        prompts_train=30,
        prompts_valid=20,
        prompts_test=20,
    )
    world.write_world(out, seed=0, sizes=sizes)
    return out


@pytest.fixture(scope="session")
def sft_dir(small_world, tmp_path_factory):
    """A briefly trained SFT stage of the small world (the RM's and PPO's starting point in tests)."""
    from instructjax import train_sft

    workdir = tmp_path_factory.mktemp("sft")
    config = load_config("configs/sft.py", "tiny")
    config.data.world_dir = str(small_world)
    config.update_from_flattened_dict({"num_steps": 6, "eval_every": 6, "checkpoint_every": 6, "batch_size": 8})
    train_sft.train(config, workdir)
    return workdir


@pytest.fixture(scope="session")
def rm_dir(small_world, sft_dir, tmp_path_factory):
    """A briefly trained RM (from ``sft_dir``), with its bias."""
    from instructjax import train_rm

    workdir = tmp_path_factory.mktemp("rm")
    config = load_config("configs/rm.py", "tiny")
    config.data.world_dir = str(small_world)
    config.init_from = str(sft_dir)
    config.update_from_flattened_dict({"num_steps": 6, "eval_every": 6, "checkpoint_every": 6, "batch_size": 8})
    train_rm.train(config, workdir)
    return workdir


def step_of_running_job(workdir: pathlib.Path) -> int:
    """The latest checkpointed step of a job that is still writing (0 if none yet). Orbax lists the steps,
    then reads each one's metadata: a step the job garbage-collects in between (keep-N) is gone by then,
    so that read is retried. Orbax checks ``exists()`` then ``is_dir()``: a step removed between the two
    reads as "not a directory", the same race."""
    from instructjax import checkpoint

    for _ in range(100):
        try:
            return checkpoint.final_step(workdir) or 0
        except (FileNotFoundError, NotADirectoryError):
            continue
    raise RuntimeError(f"the checkpoints of {workdir} kept vanishing while read")


def kill_after_checkpoint(script: str, args: list[str], workdir: pathlib.Path, step: int) -> int:
    """Run ``script`` (Python source; ``tests/`` on its path) in a child process, SIGKILL it once ``workdir``
    holds a checkpoint at or past ``step``, and return the last checkpointed step (a crash mid-training)."""
    import signal
    import subprocess
    import sys
    import time

    from instructjax import checkpoint

    path = workdir.parent / f"{workdir.name}_run.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parent)}
    child = subprocess.Popen(
        [sys.executable, str(path), *map(str, args)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while step_of_running_job(workdir) < step and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = checkpoint.final_step(workdir)
    assert killed_at is not None, f"no checkpoint in {workdir} before the kill"
    return killed_at

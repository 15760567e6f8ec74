"""One run per workdir (``workdir_lock.hold``): a second launch on a workdir a live run holds is refused, naming
the other process; a lock left by a dead process does not block the rerun; multi-host takes one lock per run.

The holder is always another process (``subprocess``): an flock belongs to an open file, so only another
process is a realistic second launch."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, load_config

from instructjax import stage, steps, train_ppo, train_rm, train_sft, workdir_lock

TIMEOUT = 120  # seconds for a helper process on a loaded 2-core machine

# Holds the workdir (argv[1]) until killed; prints "held" once it does.
HOLD = """
import sys, time
from instructjax import workdir_lock
with workdir_lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(3600)
"""

# Takes and releases the workdir's lock: exit 0, or 3 with the refusal on stdout.
TRY = """
import sys
from instructjax import workdir_lock
try:
    with workdir_lock.hold(sys.argv[1]):
        pass
except workdir_lock.WorkdirBusy as e:
    print(e, flush=True)
    sys.exit(3)
"""

# One process of a 2-process run (JAX_* set by the test): takes the run's lock, and inside it reports whether
# this process holds the file and whose pid the file names.
MULTIHOST = """
import json, os, pathlib, sys
from instructjax import sharding, workdir_lock
sharding.initialize_distributed()
from jax.experimental import multihost_utils
try:
    with workdir_lock.hold(sys.argv[1]) as lock:
        multihost_utils.sync_global_devices("locked")
        holder = json.loads((pathlib.Path(sys.argv[1]) / workdir_lock.LOCK_FILE).read_text())["pid"]
        print(json.dumps({"pid": os.getpid(), "held": lock.held, "holder": holder}), flush=True)
        multihost_utils.sync_global_devices("done")
except workdir_lock.WorkdirBusy as e:
    print(e, flush=True)
    sys.exit(3)
"""


def _python(source: str, *args) -> list[str]:
    return [sys.executable, "-c", source, *map(str, args)]


@contextlib.contextmanager
def held_by_another_process(workdir):
    """A child process holding ``workdir``'s lock for the block (SIGKILLed after it, if still alive)."""
    child = subprocess.Popen(_python(HOLD, workdir), cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held", f"the holder exited with {child.wait(TIMEOUT)}"
        yield child
    finally:
        child.kill()
        child.wait(TIMEOUT)
        child.stdout.close()


def try_from_another_process(workdir) -> subprocess.CompletedProcess:
    return subprocess.run(_python(TRY, workdir), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)


def test_a_second_launch_on_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    workdir = tmp_path / "sft"
    with held_by_another_process(workdir) as holder:
        with pytest.raises(workdir_lock.WorkdirBusy) as refused, workdir_lock.hold(workdir):
            pytest.fail("took a lock another live process holds")
        message = str(refused.value)
        assert message.startswith(f"{workdir} is in use by another run: pid {holder.pid} on host ")
        assert socket.gethostname() in message and "since " in message
        assert "workdir_lock.hold(sys.argv[1])" in message  # the holder's command line
        assert f"`kill {holder.pid}`" in message and "wait for it to finish, or stop it" in message
        assert "ignored automatically" in message
        assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text())["pid"] == holder.pid  # untouched
        other = try_from_another_process(workdir)  # a third process is refused too
        assert other.returncode == 3 and f"pid {holder.pid} on host" in other.stdout, other.stderr[-2000:]


def test_a_lock_left_by_a_killed_run_does_not_block_the_rerun(tmp_path):
    with held_by_another_process(tmp_path) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait(TIMEOUT)
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == holder.pid  # stale file left behind
    with workdir_lock.hold(tmp_path) as lock:
        assert lock.held
        assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_the_lock_is_released_when_the_block_ends_normally_or_by_an_exception(tmp_path):
    with workdir_lock.hold(tmp_path):
        inner = try_from_another_process(tmp_path)  # held meanwhile, naming this process
        assert inner.returncode == 3 and f"pid {os.getpid()} on host" in inner.stdout, inner.stderr[-2000:]
        with pytest.raises(workdir_lock.WorkdirBusy, match="this very process"):
            workdir_lock.WorkdirLock(tmp_path).acquire()  # a stage started again on its own workdir
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
    assert try_from_another_process(tmp_path).returncode == 0

    with pytest.raises(ValueError, match="boom"), workdir_lock.hold(tmp_path):
        raise ValueError("boom")
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
    after = try_from_another_process(tmp_path)
    assert after.returncode == 0, after.stdout + after.stderr[-2000:]


def _stage_config(name, tmp_path):
    """A tiny stage config; its data never needs to exist, since the refusal comes before reading any."""
    if name == "ppo":  # PPO reads its sources' config.json before opening its own workdir
        for source, preset in (("sft", "configs/sft.py"), ("rm", "configs/rm.py")):
            (tmp_path / source).mkdir()
            (tmp_path / source / stage.CONFIG_FILE).write_text(load_config(preset, "tiny").to_json_best_effort())
        config = load_config("configs/ppo.py", "tiny")
        config.policy_from, config.rm_from = str(tmp_path / "sft"), str(tmp_path / "rm")
        return config
    config = load_config(f"configs/{name}.py", "tiny")
    config.data.world_dir = str(tmp_path / "no_world")
    return config


@pytest.mark.parametrize("name, train", [("sft", train_sft.train), ("rm", train_rm.train), ("ppo", train_ppo.train)])
def test_a_stage_started_on_a_held_workdir_refuses_before_writing_anything(tmp_path, name, train):
    config = _stage_config(name, tmp_path)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / stage.CONFIG_FILE).write_text('{"the running stage": "wrote this"}\n')
    with held_by_another_process(workdir) as holder:
        with pytest.raises(workdir_lock.WorkdirBusy, match=f"in use by another run: pid {holder.pid} on host"):
            train(config, workdir)
        assert (workdir / stage.CONFIG_FILE).read_text() == '{"the running stage": "wrote this"}\n'
        assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.LOCK_FILE, stage.CONFIG_FILE]


@pytest.mark.slow
def test_a_training_stage_holds_its_workdir_and_releases_it_on_sigterm(small_world, tmp_path, monkeypatch):
    """While ``train_sft.train`` runs, another process is refused naming it; SIGTERM's save-and-exit releases."""
    config = load_config("configs/sft.py", "tiny")
    config.data.world_dir = str(small_world)
    config.update_from_flattened_dict({"num_steps": 8, "eval_every": 4, "checkpoint_every": 4, "batch_size": 8})
    refusals = []
    real_check = steps.check_finite

    def check(step, metrics):  # at step 3: try a second launch, then send the preemption notice
        real_check(step, metrics)
        if step == 3:
            refusals.append(try_from_another_process(tmp_path))
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(steps, "check_finite", check)
    assert train_sft.train(config, tmp_path)["status"] == "preempted"
    [refused] = refusals
    assert refused.returncode == 3 and f"pid {os.getpid()} on host" in refused.stdout, refused.stderr[-2000:]
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
    assert try_from_another_process(tmp_path).returncode == 0


def _launch_two_processes(workdir, tmp_path) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    children = []
    for process_id in range(2):
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(process_id),
        }
        out = open(tmp_path / f"process_{process_id}.log", "w")  # noqa: SIM115 (closed after the child)
        children.append(subprocess.Popen(_python(MULTIHOST, workdir), cwd=REPO, env=env, stdout=out, stderr=out))
        out.close()
    deadline = time.time() + TIMEOUT
    for child in children:
        child.wait(timeout=max(deadline - time.time(), 1))
    return children


def _log(tmp_path, process_id) -> str:
    return (tmp_path / f"process_{process_id}.log").read_text()


def test_multihost_takes_one_lock_per_run_and_every_process_refuses_a_held_workdir(tmp_path):
    workdir = tmp_path / "run"
    children = _launch_two_processes(workdir, tmp_path)
    assert [c.returncode for c in children] == [0, 0], _log(tmp_path, 0)[-3000:] + _log(tmp_path, 1)[-3000:]
    reports = [json.loads(_log(tmp_path, i).strip().splitlines()[-1]) for i in range(2)]
    assert [r["held"] for r in reports] == [True, False]  # process 0 alone holds it ...
    assert reports[0]["holder"] == reports[1]["holder"] == children[0].pid  # ... for the whole run
    assert not (workdir / workdir_lock.LOCK_FILE).exists()

    with held_by_another_process(workdir) as holder:
        children = _launch_two_processes(workdir, tmp_path)  # neither hangs waiting for the other
        logs = [_log(tmp_path, i) for i in range(2)]
        assert [c.returncode for c in children] == [3, 3], logs[0][-3000:] + logs[1][-3000:]
        assert f"in use by another run: pid {holder.pid} on host" in logs[0]
        assert "process 0 of this launch found its lock" in logs[1]

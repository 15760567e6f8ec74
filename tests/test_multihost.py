"""Multi-host, simulated: 2 local processes × 4 CPU devices against 1 process × 8 devices.

Each process runs the stage's own script (``scripts/train_*.py``) with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set, so ``sharding.initialize_distributed`` joins them over
127.0.0.1 (gloo collectives). The mesh is the same 8 devices either way and every process reads its own
rows of the same global batch, so the logged losses agree to float rounding.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, load_config, step_of_running_job

from instructjax import checkpoint, loop, reward, train_ppo, train_rm, train_sft
from instructjax.metrics import read_metrics

TIMEOUT = 420  # seconds for one 2-process run on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(script: str, workdir, overrides: dict) -> list[subprocess.Popen]:
    """Both processes of ``scripts/<script>.py``; their output goes to ``workdir.parent/<name>_<i>.log``."""
    port = _free_port()
    args = [sys.executable, str(REPO / "scripts" / f"{script}.py"), f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in overrides.items() if k != "config"]
    args.insert(2, f"--config={REPO / overrides['config']}")
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
        log = open(workdir.parent / f"{workdir.name}_{process_id}.log", "w")  # noqa: SIM115 (closed with the child)
        children.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    return children


def _wait(children: list[subprocess.Popen], workdir, returncode: int = 0) -> None:
    deadline = time.time() + TIMEOUT
    for child in children:
        child.wait(timeout=max(deadline - time.time(), 1))
    logs = [(workdir.parent / f"{workdir.name}_{i}.log").read_text()[-3000:] for i in range(2)]
    codes = [c.returncode for c in children]
    assert all(code == returncode for code in codes), f"return codes {codes}:\n" + "\n".join(logs)


def run_two_processes(script: str, workdir, overrides: dict) -> None:
    _wait(_start(script, workdir, overrides), workdir)


def logged(workdir, key: str) -> list[float]:
    return [row[key] for row in read_metrics(workdir) if key in row and "event" not in row]


def single_process(train, config_file: str, preset: str, workdir, overrides: dict):
    config = load_config(config_file, preset)
    config.update_from_flattened_dict(overrides)
    return train(config, workdir)


SFT = {"num_steps": 40, "checkpoint_every": 4, "eval_every": 20, "log_every": 1, "batch_size": 8}


def _wait_for_checkpoint(workdir, step: int, child: subprocess.Popen) -> None:
    deadline = time.time() + TIMEOUT
    while step_of_running_job(workdir) < step and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)


@pytest.mark.slow
def test_sft_two_processes_match_one_through_preemption_and_kill(small_world, tmp_path):
    """2 × 4 devices against 1 × 8: the same losses, through a SIGTERM that reaches one host only (both
    save and exit at the same step) and a SIGKILL of both (the rerun resumes from the last checkpoint)."""
    overrides = {"data.world_dir": str(small_world), **SFT}
    command = {"config": "configs/sft.py:tiny", **overrides}
    single_process(train_sft.train, "configs/sft.py", "tiny", tmp_path / "one", overrides)

    workdir = tmp_path / "two"
    children = _start("train_sft", workdir, command)
    _wait_for_checkpoint(workdir, 4, children[0])
    children[1].send_signal(signal.SIGTERM)  # the notice reaches process 1 only
    _wait(children, workdir, returncode=loop.EXIT_PREEMPTED)  # both saved and said "try again"
    preempted_at = checkpoint.final_step(workdir)
    assert 4 <= preempted_at < 40, preempted_at

    children = _start("train_sft", workdir, command)
    _wait_for_checkpoint(workdir, preempted_at + 4, children[0])
    for child in children:  # every host dies at once, with no warning
        child.send_signal(signal.SIGKILL)
        child.wait()
    killed_at = checkpoint.final_step(workdir)
    assert preempted_at < killed_at < 40, (preempted_at, killed_at)
    run_two_processes("train_sft", workdir, command)  # the same command again finishes the run

    one, two = logged(tmp_path / "one", "loss"), logged(workdir, "loss")
    assert len(one) == 40
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logged(workdir, "val_loss"), logged(tmp_path / "one", "val_loss"), atol=1e-5)


@pytest.mark.slow
def test_rm_two_processes_match_one(small_world, sft_dir, tmp_path):
    overrides = {
        "data.world_dir": str(small_world),
        "init_from": str(sft_dir),
        "num_steps": 6,
        "eval_every": 3,
        "log_every": 1,
        "batch_size": 8,
    }
    single_process(train_rm.train, "configs/rm.py", "tiny", tmp_path / "one", overrides)
    run_two_processes("train_rm", tmp_path / "two", {"config": "configs/rm.py:tiny", **overrides})
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(logged(tmp_path / "two", key), logged(tmp_path / "one", key), atol=1e-5, err_msg=key)
    # The bias is a function of the trained params, not of a loss: Adam turns the all-reduce's rounding
    # in near-zero gradients into differences of up to a learning rate in a few weights.
    bias = [reward.load_bias(tmp_path / d) for d in ("one", "two")]
    np.testing.assert_allclose(bias[1], bias[0], rtol=1e-3)


@pytest.mark.slow
def test_ppo_two_processes_match_one(sft_dir, rm_dir, tmp_path):
    overrides = {
        "policy_from": str(sft_dir),
        "rm_from": str(rm_dir),
        "num_iterations": 2,
        "batch_size": 16,
        "minibatch_size": 8,
        "eval_prompts": 16,
        "eval_batch_size": 16,
        "eval_every": 2,
    }
    single_process(train_ppo.train, "configs/ppo.py", "tiny", tmp_path / "one", overrides)
    run_two_processes("train_ppo", tmp_path / "two", {"config": "configs/ppo.py:tiny", **overrides})
    for key in ("pg_loss", "value_loss", "rm_score", "gold_score", "kl", "val_rm_score", "val_gold_score"):
        one, two = logged(tmp_path / "one", key), logged(tmp_path / "two", key)
        assert len(one) >= 2, key
        np.testing.assert_allclose(two, one, atol=1e-5, err_msg=key)


def test_partial_multihost_environment_is_an_error():
    script = "from instructjax import sharding; sharding.initialize_distributed()"
    env = {**os.environ, "JAX_NUM_PROCESSES": "2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "JAX_COORDINATOR_ADDRESS" in out.stderr

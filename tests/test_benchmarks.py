"""The accelerator benchmark's code path, at tiny shapes on CPU (``benchmarks/accelerator.py --smoke``): what a
GPU session runs first must not be broken when it gets there."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_accelerator_benchmark_smoke_prints_its_figures():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/accelerator.py"), "--smoke", "--repeats=1"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["peaks"] == "measured" and result["peak_flops_per_s"] > 0 and result["hbm_bytes_per_s"] > 0
    assert 0 < result["sft"]["mfu"] < 1 and result["sft"]["batch"] == 32
    assert 0 < result["decode"]["fraction_of_roofline"] < 1
    ppo = result["ppo"]["small"]
    assert set(ppo["seconds"]) == {"generate", "score", "update", "ptx"} and ppo["compiles_after_first"] == 0
    assert ppo["peak_host_rss_bytes"] > 0 and 0 < ppo["generation_share"] < 1
    assert "MFU" in done.stdout and "of the HBM roofline" in done.stdout


def test_ppo_iteration_benchmark_reports_every_phase():
    """``benchmarks/ppo_iteration.py`` at the tiny shape: four timed phases, nothing compiled after the first
    iteration, and the decode step against the measured read bandwidth."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/ppo_iteration.py"), "--model=tiny", "--batch=8", "--minibatch=4"]
        + ["--prompt_len=8", "--response_len=8", "--ptx_ratio=2"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["seconds"]) == {"generate", "score", "update", "ptx"}
    assert all(result["flops"][k] > 0 for k in result["seconds"]) and result["ptx_rows_per_minibatch"] == 8
    assert result["compiled_first_iteration"] > 0 and result["compiles_after_first"] == 0
    assert result["iteration_s"] == pytest.approx(sum(result["seconds"].values()))
    assert result["decode"]["fraction_of_read_bandwidth"] > 0 and result["peak_host_rss_bytes"] > 0

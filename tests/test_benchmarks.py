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
    assert set(ppo["seconds"]) == {"generate", "score", "update"} and not ppo["compiles_grew"]
    assert ppo["peak_host_rss_bytes"] > 0 and 0 < ppo["generation_share"] < 1
    assert "MFU" in done.stdout and "of the HBM roofline" in done.stdout

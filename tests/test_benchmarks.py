"""The benchmarks' code paths at tiny shapes on CPU (``accelerator.py --smoke``, ``ppo_iteration.py``,
``lm_head.py``, ``tunix_compare.py``): what a GPU session runs first must not be broken when it gets there."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


def run_benchmark(script: str, *args: str) -> tuple[dict, str]:
    """``python benchmarks/SCRIPT ARGS`` on CPU: its last stdout line as JSON, and the whole stdout."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


@pytest.mark.slow
def test_accelerator_benchmark_smoke_prints_its_figures():
    result, stdout = run_benchmark("accelerator.py", "--smoke", "--repeats=1")
    assert result["peaks"] == "measured" and result["peak_flops_per_s"] > 0 and result["hbm_bytes_per_s"] > 0
    assert 0 < result["sft"]["mfu"] < 1 and result["sft"]["batch"] == 32
    assert 0 < result["decode"]["fraction_of_roofline"] < 1
    ppo = result["ppo"]["small"]
    assert set(ppo["seconds"]) == {"generate", "score", "update", "ptx"} and ppo["compiles_after_first"] == 0
    assert ppo["peak_host_rss_bytes"] > 0 and 0 < ppo["generation_share"] < 1
    assert "MFU" in stdout and "of the HBM roofline" in stdout


def test_ppo_iteration_benchmark_reports_every_phase():
    """``benchmarks/ppo_iteration.py`` at the tiny shape: four timed phases, nothing compiled after the first
    iteration, and the decode step against the measured read bandwidth."""
    # 32 decode steps and the best of 3: the decode step is a difference of two timings, which 8 steps timed
    # once on a busy machine could turn negative
    shape = ["--batch=8", "--minibatch=4", "--prompt_len=8", "--response_len=32", "--ptx_ratio=2", "--repeats=3"]
    result, _ = run_benchmark("ppo_iteration.py", "--model=tiny", *shape)
    assert set(result["seconds"]) == {"generate", "score", "update", "ptx"}
    assert all(result["flops"][k] > 0 for k in result["seconds"]) and result["ptx_rows_per_minibatch"] == 8
    assert result["compiled_first_iteration"] > 0 and result["compiles_after_first"] == 0
    assert result["iteration_s"] == pytest.approx(sum(result["seconds"].values()))
    assert result["decode"]["fraction_of_read_bandwidth"] > 0 and result["peak_host_rss_bytes"] > 0


def test_lm_head_benchmark_times_both_heads():
    result, _ = run_benchmark("lm_head.py", "--shapes=2x8x16", "--vocab=64", "--repeats=1")
    assert set(result["timings"][0]["seconds"]) == {
        f"{k}_{h}" for k in ("forward", "gradient") for h in ("blocked", "plain")
    }


def test_tunix_comparison_runs_the_same_function_on_both_sides():
    """Only where google-tunix is installed (``pip install -e '.[compare]'``): the weights copied into Tunix's
    Llama give the same logits and the same greedy tokens as instructjax's model."""
    pytest.importorskip("tunix")
    args = ("--vocab=512", "--d_model=64", "--layers=2", "--batch=2", "--prompt=8", "--new=8", "--repeats=1")
    result, _ = run_benchmark("tunix_compare.py", *args)
    assert result["logits_max_abs_diff"] < 1e-4 and result["greedy_token_agreement"] == 1.0
    assert result["tokens_per_s"]["instructjax"] > 0 and result["tokens_per_s"]["tunix"] > 0

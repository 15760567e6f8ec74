"""Timing shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this directory is on the path)."""

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

MATMUL_N = 1024  # the square matmul whose rate is each framework's peak: 2·n³ FLOPs per call


def jax_matmul_run(dtype: str = "float32") -> Callable[[], None]:
    """A jitted MATMUL_N² matmul; ``matmul_flops_per_s`` turns its best time into a rate."""
    a = jnp.ones((MATMUL_N, MATMUL_N), dtype)
    f = jax.jit(lambda a: a @ a)
    return lambda: f(a).block_until_ready()


def matmul_flops_per_s(seconds: float) -> float:
    return 2 * MATMUL_N**3 / seconds


def best_interleaved(
    runs: dict[str, Callable[[], None]], repeats: int, warmups: int = 1, settle_s: float = 0.5
) -> dict[str, float]:
    """Each run's best time in seconds over ``repeats``, after ``warmups`` untimed calls (compiling).

    The runs take turns, one repeat of each per round, so that a slow spell of a shared machine hits
    all of them alike and the ratios between them stay comparable: on a busy 2-core machine one
    framework's figure alone moves a lot between runs minutes apart (docs/benchmarks.md, "Method").

    Each timed call starts after ``settle_s`` seconds of sleep, so that the previous run's worker
    threads have gone idle: thread pools spin for a while after their last parallel task (Intel
    OpenMP's, under PyTorch, for 200 ms by default), and on 2 cores that takes CPU from whatever runs
    next: a matmul timed straight after the train step runs markedly slower than after the pause
    (docs/benchmarks.md, "Method").
    """
    for run in runs.values():
        for _ in range(warmups):
            run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            time.sleep(settle_s)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}

"""Timing shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this directory is on the path)."""

import time
from collections.abc import Callable


def best_interleaved(runs: dict[str, Callable[[], None]], repeats: int, warmups: int = 1) -> dict[str, float]:
    """Each run's best time in seconds over ``repeats``, after ``warmups`` untimed calls (compiling).

    The runs take turns, one repeat of each per round, so that a slow spell of a shared machine hits
    all of them alike and the ratios between them stay comparable: on a busy 2-core machine one
    framework's figure alone moved by 1.8x between runs minutes apart (docs/benchmarks.md).
    """
    for run in runs.values():
        for _ in range(warmups):
            run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}

"""The predicted step time of a compiled TPU program (``aot_compiler.predict``): the arithmetic on a hand-made case,
and, where libtpu is installed, positive bounds for the smallest preset's evaluation step (CI installs only
'.[test]': that test skips there, like tests/test_aot.py)."""

import importlib.util

import pytest
from conftest import load_config

from instructjax import aot, aot_compiler, tpu_predict


def test_prediction_is_the_largest_of_three_bounds():
    peaks = (100e12, 1e12, 100e9)  # FLOP/s, HBM bytes/s, ICI bytes/s
    # 50 TFLOP -> 0.5 s; 200 GB of traffic -> 0.2 s; 10 GB gathered + 10 GB all-reduced (twice over the links) -> 0.3 s
    out = tpu_predict.predict(50e12, 200e9, {"all-gather": 10e9, "all-reduce": 10e9}, peaks, useful_flops=40e12)
    assert out["compute_seconds"] == pytest.approx(0.5)
    assert out["memory_seconds"] == pytest.approx(0.2)
    assert out["ici_seconds"] == pytest.approx(0.3)
    assert out["seconds"] == pytest.approx(0.5) and out["bound"] == "compute"
    assert out["mfu"] == pytest.approx(40e12 / (0.5 * 100e12))  # model FLOPs over the predicted time at peak
    slow_links = tpu_predict.predict(50e12, 200e9, {"all-gather": 100e9}, peaks)
    assert slow_links["bound"] == "ici" and slow_links["seconds"] == pytest.approx(1.0)
    assert slow_links["mfu"] == pytest.approx(0.5)  # without model FLOPs: the program's own FLOPs


def test_chip_peaks_per_device():
    assert set(tpu_predict.CHIP_PEAKS) == set(aot_compiler.HBM_GIB_PER_CHIP)
    assert tpu_predict.device_peaks("v5e", 4, 4) == tpu_predict.CHIP_PEAKS["v5e"]
    assert tpu_predict.device_peaks("v4", 4, 8)[0] == pytest.approx(275e12 / 2)  # two devices per chip


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_smallest_preset_has_positive_bounds():
    config = load_config("configs/tpu.py", "sft_1p3b")  # v5e:2x2, the smallest slice of any preset
    report = aot.compile_config(config, config.tpu_slice, "eval_step")
    (program,) = aot_compiler.report_dict(report)["programs"]
    pred = program["prediction"]
    assert pred["compute_seconds"] > 0 and pred["memory_seconds"] > 0 and pred["ici_seconds"] > 0, pred
    assert pred["seconds"] == max(pred["compute_seconds"], pred["memory_seconds"], pred["ici_seconds"])
    assert 0 < pred["mfu"] <= 1

"""A PREDICTED step time for a TPU program from its per-device counts (``aot_compiler`` measures them from the
compiled program): FLOPs at the chip's bf16 peak, HBM bytes at its bandwidth, collective bytes at its ICI
bandwidth, with the chips' published figures. Nothing here was measured on a TPU (docs/scaling.md)."""

from __future__ import annotations

# Per chip: bf16 peak FLOP/s, HBM bytes/s, and ICI bytes/s in one direction (half the bidirectional figure), from
# the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v5e 197 TFLOPs,
# 819 GBps, 400 GBps bidirectional; v5p 459 TFLOPs, 2765 GBps, 1200 GBps bidirectional (4800 Gbps); v6e
# 918 TFLOPs, 1638 GBps, 800 GBps bidirectional; v4 275 TFLOPs, 1200 GBps, and no per-chip ICI figure: its
# all-reduce bandwidth per Pod (1.1 PB/s) over 4096 chips, 269 GB/s, the same ratio as v5e's (51.2 TB/s over
# 256 chips = 200 GB/s = its 1600 Gbps).
CHIP_PEAKS = {
    "v4": (275e12, 1200e9, 269e9),
    "v5e": (197e12, 819e9, 200e9),
    "v5p": (459e12, 2765e9, 600e9),
    "v6e": (918e12, 1638e9, 400e9),
}

# An all-reduce is a reduce-scatter then an all-gather: its array crosses the links twice.
_LINK_TRIPS = {"all-reduce": 2.0}


def predict(flops: float, hbm_bytes: float, collectives: dict, peaks: tuple, useful_flops: float | None = None) -> dict:
    """A PREDICTION of one device's time for a program, from its counts (per device) and the chip's ``peaks``
    (bf16 FLOP/s, HBM bytes/s, ICI bytes/s one way; ``CHIP_PEAKS`` per device): three lower bounds,

        compute = flops / peak,   memory = hbm_bytes / hbm_bw,   ici = Σ_kind bytes_kind × trips_kind / ici_bw

    (``trips`` 2 for an all-reduce, else 1), and ``seconds = max(compute, memory, ici)``: the program cannot be
    faster than its slowest resource, and is that fast only if the other two overlap with it entirely.
    ``mfu = useful_flops / (seconds × peak)`` (``useful_flops`` defaults to ``flops``); ``bound`` names the
    largest term. Nothing here was measured on a TPU."""
    peak, hbm_bw, ici_bw = peaks
    bounds = {
        "compute": flops / peak,
        "memory": hbm_bytes / hbm_bw,
        "ici": sum(b * _LINK_TRIPS.get(k, 1.0) for k, b in collectives.items()) / ici_bw,
    }
    seconds = max(bounds.values())
    useful = flops if useful_flops is None else useful_flops
    return {
        **{f"{k}_seconds": v for k, v in bounds.items()},
        "seconds": seconds,
        "bound": max(bounds, key=bounds.get),
        "mfu": useful / (seconds * peak) if seconds > 0 else 0.0,
    }


def device_peaks(family: str, chips: int, devices: int) -> tuple:
    """``CHIP_PEAKS`` of ``family`` per device (v4 lists a chip's two cores as devices where libtpu does)."""
    return tuple(x * chips / devices for x in CHIP_PEAKS[family])

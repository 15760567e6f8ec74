"""Metrics out of a training loop: ``metrics.jsonl``, TensorBoard events, a progress bar; MFU.

Process 0 writes; other processes get a writer that does nothing. On resume the JSONL file is cut back
to the restored step, so a killed-and-rerun stage has one line per step, as if it never stopped.

MFU uses the MaxText convention with causal attention (``calculate_tflops_training_per_device`` in MaxText's
``maxtext_utils.py``; docs/references.md): per token,
``6·N_matmul + 6·L·T·Hq·Q`` FLOPs for training (forward + backward), where N_matmul counts the
QKV, output, MLP and unembedding matrices (not the embedding lookup).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip: the TPU tables of the JAX scaling book ("How to Scale Your Model", tpus.md)
# and MaxText's performance_metrics.md for v6e; GPUs as Levanter's flop_utils.py. CPUs are measured at start-up.
PEAK_FLOPS = {
    "TPU v4": 2.75e14,
    "TPU v5 lite": 1.97e14,
    "TPU v5e": 1.97e14,
    "TPU v5p": 4.59e14,
    "TPU v6 lite": 9.18e14,
    "TPU v6e": 9.18e14,
    "NVIDIA A100-SXM4-80GB": 3.12e14,
    "NVIDIA A100-SXM4-40GB": 3.12e14,
    "NVIDIA H100 80GB HBM3": 9.89e14,
    "NVIDIA H200": 9.89e14,
}


def training_flops_per_token(cfg: Any, seq_len: int) -> float:
    """MaxText causal training FLOPs per token for a ``ModelConfig``."""
    d, q, hq, hkv = cfg.d_model, cfg.dim_per_head, cfg.n_heads, cfg.num_kv_heads
    mlp_mats = 3 if cfg.mlp == "swiglu" else 2
    per_layer = d * (hq + 2 * hkv) * q + hq * q * d + mlp_mats * d * cfg.d_ff
    n_matmul = cfg.n_layers * per_layer + d * cfg.vocab_size
    return 6.0 * n_matmul + 6.0 * cfg.n_layers * seq_len * hq * q


def peak_flops_per_device() -> float:
    """The chip's dense bf16 peak from the table; on CPU (or an unknown chip) a measured f32 matmul rate."""
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    a = jax.numpy.ones((1024, 1024), jax.numpy.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    return 2 * 1024**3 * 5 / (time.perf_counter() - start)


_progress_label: str | None = None


@contextlib.contextmanager
def progress_label(label: str) -> Iterator[None]:
    """Names the progress bar of every stage run inside, e.g. the pipeline's ``"[3/7] rm"``, so a long job
    shows which stage it is in next to that stage's progress and ETA."""
    global _progress_label
    previous, _progress_label = _progress_label, label
    try:
        yield
    finally:
        _progress_label = previous


class MetricsWriter:
    """Writes one JSON object per logged step to ``workdir/metrics.jsonl`` and the same scalars to
    TensorBoard (``workdir/tb``) and, when ``wandb`` is given, to Weights & Biases; drives a tqdm progress bar.

    ``wandb``: ``{"project", "mode", "config"}`` (``config.logging.wandb=True``). The run's id is kept in
    ``workdir/wandb_run_id``, so a resumed stage continues the same run; ``mode='offline'`` (or
    ``WANDB_MODE=offline``) writes it under ``workdir/wandb`` with no network, for ``wandb sync`` later."""

    def __init__(
        self,
        workdir: str | pathlib.Path,
        total_steps: int,
        resume_step: int = 0,
        desc: str = "train",
        wandb: dict | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = self._bar = self._wandb = None
        if not self.enabled:
            return
        if self.path.exists():  # keep what the restored checkpoint had already logged
            kept = [
                line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter
        from tqdm.auto import tqdm

        self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))
        if wandb is not None:
            self._wandb = _wandb_run(pathlib.Path(workdir), desc, **wandb)
        self._bar = tqdm(
            total=total_steps, initial=resume_step, desc=_progress_label or desc, dynamic_ncols=True, mininterval=1.0
        )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _scalar(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        scalars = {k: v for k, v in clean.items() if isinstance(v, int | float)}
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def progress(self, step: int, **shown: float) -> None:
        if self.enabled:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def restart_clock(self, step: int) -> None:
        """Restart the bar's rate and ETA at ``step``: called once the first step (compilation) is done, so the
        estimate measures training, not compilation (which made the first ETA many times too long)."""
        if self.enabled:
            self._bar.reset()  # clock and smoothed rate from now
            self._bar.initial = self._bar.n = self._bar.last_print_n = step
            self._bar.refresh()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


def _wandb_run(workdir: pathlib.Path, name: str, project: str, mode: str, config: dict) -> Any:
    """A Weights & Biases run for this stage workdir: the same run again when the stage resumes."""
    try:
        import wandb  # optional: pip install -e '.[wandb]'
    except ImportError:
        raise ImportError("config.logging.wandb=True but wandb is not installed: pip install wandb") from None
    id_file = workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=project,
        name=f"{workdir.name} ({name})",
        id=run_id,
        resume="allow",
        dir=str(workdir),
        config=config,
        mode=mode or None,
    )


def _scalar(v: Any) -> Any:
    if isinstance(v, jax.Array | np.ndarray | np.generic):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    return v


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """All rows of a stage's ``metrics.jsonl``."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

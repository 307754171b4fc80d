"""Training throughput, time spent waiting for data, and model-FLOPs utilisation (MFU).

Every `every_n_steps` training batches it logs, over that window:

* `perf/samples_per_sec` — samples of all ranks per second of wall time (local samples x world size);
* `perf/data_wait_fraction` — the share of wall time outside the training step: from one `on_train_batch_end`
  to the next `on_train_batch_start`, which is where the next batch is fetched (it also holds anything else run
  between steps, such as a checkpoint save). Near 0: the input pipeline keeps up; near 1: the model waits for it;
* `perf/mfu` — achieved FLOP/s of this device / its measured matmul ceiling (PaLM, Chowdhery et al. 2022,
  appendix B, with a measured instead of a datasheet peak). The FLOPs of one training batch (forward, backward)
  are counted once, on the first batch of the fit, with `torch.utils.flop_counter.FlopCounterMode`; the ceiling is
  the best rate of a square matmul in the precision's compute dtype, measured once at fit start.

Time is host wall time, without device synchronisation (which would slow training down): on an asynchronous
device the numbers are exact over a window, not per step. Validation between steps is not counted.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.flop_counter import FlopCounterMode

from vlp_lightning.methods.base import batch_size_of


def compute_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision setting (`bf16-mixed` -> bfloat16, `16-mixed` -> float16, ...)."""
    if "bf16" in precision:
        return torch.bfloat16
    if "16" in precision:
        return torch.float16
    if "64" in precision:
        return torch.float64
    return torch.float32


def measure_matmul_ceiling(
    device: torch.device, dtype: torch.dtype, size: int | None = None, min_seconds: float = 0.2
) -> float:
    """Best FLOP/s of an [n, n] @ [n, n] matmul on `device` (n = 4096 on accelerators, 1024 on CPU), timed for at
    least `min_seconds` after a warm-up."""
    size = size or (1024 if device.type == "cpu" else 4096)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)
    synchronize()
    best, started = 0.0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


class ThroughputMonitor(Callback):
    """Logs `perf/samples_per_sec`, `perf/data_wait_fraction` and `perf/mfu` every `every_n_steps` batches.

    Args:
        every_n_steps: training batches per measurement window.
        ceiling_matrix_size: side of the matmul that measures the device ceiling (None: 4096, 1024 on CPU).
    """

    def __init__(self, every_n_steps: int = 50, ceiling_matrix_size: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.ceiling_matrix_size = ceiling_matrix_size
        self.ceiling_flops_per_sec: float | None = None
        self.flops_per_batch: int | None = None
        self._flop_counter: FlopCounterMode | None = None
        self._last_end: float | None = None
        self._batch_start = 0.0
        self._reset_window()

    def _reset_window(self) -> None:
        self._window_batches = 0
        self._window_samples = 0
        self._window_wait = 0.0
        self._window_step = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dtype = compute_dtype(str(trainer.precision))
        self.ceiling_flops_per_sec = measure_matmul_ceiling(pl_module.device, dtype, self.ceiling_matrix_size)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_end = time.perf_counter()  # the first fetch of the epoch counts as waiting for data

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._last_end = time.perf_counter()  # validation in the middle of training is not waiting for data

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()
        if self.flops_per_batch is None:
            self._flop_counter = FlopCounterMode(display=False)
            self._flop_counter.__enter__()
        elif self._last_end is not None:
            self._window_wait += self._batch_start - self._last_end

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._flop_counter is not None:  # the counted batch runs slower; it stays out of the windows
            self._stop_counting()
        else:
            self._window_step += now - self._batch_start
            self._window_batches += 1
            self._window_samples += batch_size_of(batch)
            if self._window_batches >= self.every_n_steps:
                self._log_window(trainer, pl_module)
        self._last_end = time.perf_counter()

    def _stop_counting(self) -> None:
        self._flop_counter.__exit__(None, None, None)
        self.flops_per_batch = self._flop_counter.get_total_flops()
        self._flop_counter = None
        if self.flops_per_batch == 0:
            rank_zero_warn("ThroughputMonitor counted no FLOPs (a compiled model hides them); perf/mfu is not logged")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._flop_counter is not None:
            self._stop_counting()

    def _log_window(self, trainer: Trainer, pl_module: LightningModule) -> None:
        elapsed = self._window_wait + self._window_step
        metrics = {
            "perf/samples_per_sec": self._window_samples * trainer.world_size / elapsed,
            "perf/data_wait_fraction": self._window_wait / elapsed,
        }
        if self.flops_per_batch and self.ceiling_flops_per_sec:
            metrics["perf/mfu"] = self.flops_per_batch * self._window_batches / elapsed / self.ceiling_flops_per_sec
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._reset_window()

"""The throughput of a real ``fit``: a callback that times the training loop as a user runs it.

:class:`StepThroughput` measures what ``python Stage1_MAE.py fit ...`` sustains, data loader, host-to-device
copy, normalisation on the device, the (compiled) step, the optimizer, gradient clipping and logging
included, which the bare-step timing of ``scripts/benchmark_train.py`` leaves out.
``scripts/benchmark_fit.py`` runs Stage 1 with it on a generated CheXpert-layout release through the uint8
image cache (docs/performance.md#fit-path).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from pacx.perf.train import mfu
from pacx.utils import write_json_atomic

log = logging.getLogger(__name__)


def batch_length(batch) -> int:
    """Samples in a batch: the leading size of its first tensor (a tensor, a tuple/list or a dict of them)."""
    first = batch
    while not isinstance(first, torch.Tensor):
        if isinstance(first, dict) and first:
            first = next(iter(first.values()))
        elif isinstance(first, (list, tuple)) and first:
            first = first[0]
        else:
            raise TypeError(f"cannot count the samples of a batch of type {type(batch).__name__}")
    return int(first.shape[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepThroughput(Callback):
    """Images per second of the training loop after ``warmup_steps`` optimizer steps, MFU, peak memory.

    The clock starts at the first training batch once ``trainer.global_step`` reaches ``warmup_steps`` (after
    compilation, the loader's start and the allocator's growth) and stops after the batch that reaches
    ``trainer.max_steps`` (before the epoch-end hooks, checkpoints among them), or when training ends if
    it stops otherwise; the device is synchronised at both ends. Every rank counts its own batches, so
    ``img_per_s`` is the whole job's rate (ranks × one rank's) and ``img_per_s_per_device`` one rank's.
    When the module has ``train_flops_per_image()`` (:meth:`pacx.lit.mae.MAEModule.train_flops_per_image`),
    ``mfu`` is the analytic FLOP rate per device over ``peak_tflops`` (989: an H100/H200's dense bf16 peak).
    ``peak_memory_gib`` is the largest CUDA allocation of the whole fit (``None`` on a CPU).

    Rank zero logs the result and writes it to ``json_path`` if given.

    Args:
        warmup_steps: optimizer steps before the clock starts; the fit needs ``max_steps`` above it.
        json_path: where to write the result (a JSON object).
        peak_tflops: the device's peak, for ``mfu``.
    """

    def __init__(self, warmup_steps: int = 20, json_path: str | None = None,
                 peak_tflops: float = 989.0) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
        self.warmup_steps = warmup_steps
        self.json_path = json_path
        self.peak_tflops = peak_tflops
        self.result: dict | None = None
        self._start: float | None = None
        self._end: float | None = None
        self._start_step = self._end_step = 0
        self._images = 0
        self._batches = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if 0 <= trainer.max_steps <= self.warmup_steps:
            raise ValueError(f"StepThroughput: trainer.max_steps ({trainer.max_steps}) must exceed "
                             f"warmup_steps ({self.warmup_steps}), otherwise no step is timed")
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._start, self._end, self._images, self._batches, self.result = None, None, 0, 0, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch,
                             batch_idx: int) -> None:
        if self._start is None and trainer.global_step >= self.warmup_steps:
            _sync(pl_module.device)
            self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._start is None or self._end is not None:
            return
        self._images += batch_length(batch)
        self._batches += 1
        if 0 < trainer.max_steps <= trainer.global_step:
            _sync(pl_module.device)
            self._end, self._end_step = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None or self._batches == 0:
            log.warning("StepThroughput: no batch after the %d warm-up steps was timed", self.warmup_steps)
            return
        device = pl_module.device
        if self._end is None:
            _sync(device)
            self._end, self._end_step = time.perf_counter(), trainer.global_step
        seconds = self._end - self._start
        steps = self._end_step - self._start_step
        per_device = self._images / seconds
        flops_fn = getattr(pl_module, "train_flops_per_image", None)
        flops = int(flops_fn()) if callable(flops_fn) else None
        self.result = {
            "img_per_s": per_device * trainer.world_size,
            "img_per_s_per_device": per_device,
            "mfu": mfu(flops * per_device, 1.0, self.peak_tflops) if flops else None,
            "train_flops_per_image": flops,
            "peak_tflops": self.peak_tflops,
            "timed_steps": steps,
            "timed_batches": self._batches,
            "timed_images_per_device": self._images,
            "seconds": seconds,
            "step_s_mean": seconds / steps if steps else None,
            "warmup_steps": self.warmup_steps,
            "world_size": trainer.world_size,
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": str(trainer.precision),
            "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                else None),
        }
        if trainer.is_global_zero:
            log.info("fit throughput after %d warm-up steps: %.1f img/s (%.1f per device) over %d steps, "
                     "MFU %s, peak memory %s", self.warmup_steps, self.result["img_per_s"], per_device, steps,
                     "n/a" if self.result["mfu"] is None else f"{self.result['mfu']:.1%}",
                     "n/a" if self.result["peak_memory_gib"] is None
                     else f"{self.result['peak_memory_gib']:.1f} GiB")
            if self.json_path:
                write_json_atomic(Path(self.json_path), self.result)


def read_throughput(path: str | Path) -> dict:
    """A :class:`StepThroughput` result file, checked for a positive ``img_per_s``."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a throughput result: {err}") from None
    rate = result.get("img_per_s") if isinstance(result, dict) else None
    if not isinstance(rate, (int, float)) or rate <= 0:
        raise ValueError(f"{path}: expected a positive img_per_s, got {rate!r}")
    return result

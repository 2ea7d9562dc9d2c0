"""Callbacks the resume tests add to real runs from the command line (``--trainer.callbacks+=...``).

They change nothing a run computes: they only stop the process, slow and report its steps, or stand in for
an input the run loads while it runs.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from pytorch_lightning.callbacks import Callback


class KillAtStep(Callback):
    """``SIGKILL`` this process (no cleanup, no final save) once ``global_step`` reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class Interrupted(RuntimeError):
    pass


class RaiseAtStep(Callback):
    """Raise :class:`Interrupted` once ``global_step`` reaches ``step`` (an in-process crash; Lightning runs
    checkpoint callbacks after the others, so that step's own checkpoint is not written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise Interrupted(f"stopped at step {trainer.global_step}")


class StepProgress(Callback):
    """Writes ``{"global_step", "restart"}`` to ``path`` after each step and sleeps ``sleep`` seconds, so a
    test can signal a job while it is training."""

    def __init__(self, path: str, sleep: float = 0.0) -> None:
        self.path, self.sleep = Path(path), sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"global_step": trainer.global_step,
                                       "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}))
            os.replace(tmp, self.path)
        time.sleep(self.sleep)


class SignalAtStep(Callback):
    """Send ``signum`` (default ``SIGTERM``) to this process once ``global_step`` reaches ``step``: a
    catchable kill, which Lightning turns into an exception at the next step boundary."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum = step, int(signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class LoadsADebugInput(Callback):
    """Stands in for an input a run loads in ``setup`` (as on-the-fly teachers are): one whose record says it
    comes from a debug run."""

    def setup(self, trainer, pl_module, stage) -> None:
        from pacx.debug import check_not_debug

        check_not_debug({"limit_train_batches": 2}, "a teacher loaded in setup")

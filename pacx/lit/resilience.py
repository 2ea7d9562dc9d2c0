"""Runs that survive preemption, time limits and ``kill -9`` without changing what they compute.

:class:`StepSeeds` (per-batch reseeding), :class:`SlurmRequeue` (checkpoint and requeue on SLURM's warning
signal), :class:`LastCheckpoint` (``last.ckpt`` every epoch), :class:`AtomicCheckpointIO` (write, then rename)
and :func:`slurm_allocation` (trainer nodes and devices from srun's allocation). How each works, and why
Lightning's own behaviour was not enough: docs/design.md#resilience.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from pacx.data.resumable import run_seed, seed_step

log = logging.getLogger(__name__)


class RunRequeued(SystemExit):
    """Raised after the checkpoint is saved and the job requeued; exits the process with status 0."""

    def __init__(self, job: str) -> None:
        super().__init__(0)
        self.job = job

    def __str__(self) -> str:
        return f"requeued SLURM job {self.job}"


class StepSeeds(Callback):
    """Before each training batch: seed torch / numpy / random from ``(run seed, epoch, batch, rank)``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        seed_step(run_seed(), trainer.current_epoch, batch_idx, trainer.global_rank)


def slurm_job_id() -> str:
    """``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
        raise RuntimeError(f"unexpected SLURM job id {job!r}")
    return job


def slurm_restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def slurm_managed() -> bool:
    """True in a process srun launched as one task of a batch job (Lightning's SLURM detection)."""
    return SLURMEnvironment.detect()


def slurm_allocation() -> tuple[int, int]:
    """``(nodes, tasks per node)`` of the job step this process belongs to."""
    nodes = int(os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1)
    tasks = int(os.environ["SLURM_NTASKS"])
    if tasks % nodes:
        raise RuntimeError(f"SLURM_NTASKS={tasks} does not divide over SLURM_NNODES={nodes}: use "
                           "--ntasks-per-node")
    return nodes, tasks // nodes


class SlurmRequeue(Callback):
    """Checkpoint at a step boundary and requeue the SLURM job when ``signum`` arrives (see the module doc).

    Args:
        ckpt_path: where to save (the run's ``checkpoints/last.ckpt``, which a requeued run resumes from).
        signum: the warning signal (``--signal=USR1@<seconds>``).
        requeue_command: the command run by rank 0 with the job id appended.
    """

    def __init__(self, ckpt_path: str | Path, signum: int = signal.SIGUSR1,
                 requeue_command: tuple[str, ...] = ("scontrol", "requeue")) -> None:
        self.ckpt_path = Path(ckpt_path)
        self.signum = signum
        self.requeue_command = tuple(requeue_command)
        self.requested = False
        self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.requested = True  # only a flag: the work happens at the next step boundary

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._on_signal)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _agreed(self, trainer) -> bool:
        """Whether any rank got the signal (an all-reduce under DDP, so every rank stops at the same step)."""
        flag = self.requested
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0], device=trainer.strategy.root_device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._agreed(trainer):
            return
        job = slurm_job_id()
        log.warning("signal %d: saving %s at global step %d, then requeueing job %s", self.signum,
                    self.ckpt_path, trainer.global_step, job)
        # a full training checkpoint; all ranks
        trainer.save_checkpoint(str(self.ckpt_path), weights_only=False)
        # the requeue makes Slurm SIGTERM the job: the checkpoint is safe, so let the ranks finish exiting
        # instead of running Lightning's SIGTERM handler (a collective inside a signal handler)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if trainer.is_global_zero:
            result = subprocess.run([*self.requeue_command, job], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"`{' '.join(self.requeue_command)} {job}` failed ({result.returncode}): "
                                   f"{result.stderr.strip()}; the checkpoint {self.ckpt_path} is saved, "
                                   "resume with --ckpt_path last")
        trainer.strategy.barrier("pacx-requeue")
        raise RunRequeued(job)


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` after every validation and every training epoch, and every
    ``every_n_train_steps`` optimizer steps when that is > 0. It keeps no top-k checkpoints; the run's
    monitored "best" checkpoint is a separate ``ModelCheckpoint(save_last=False)``.

    Lightning's own ``save_last`` follows the top-k decision at epoch ends (see the module doc); this class
    keeps ModelCheckpoint's skip rules (no save in sanity checks, ``fast_dev_run`` or outside ``fit``, none
    twice at one step, so an epoch-end validation and the epoch end save once) and always writes.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 0) -> None:
        super().__init__(dirpath=str(dirpath), save_last=True, save_top_k=0, monitor=None,
                         every_n_train_steps=every_n_train_steps or None, enable_version_counter=False)

    def _save_last_now(self, trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        self._save_last_now(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save_last_now(trainer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``.<name>.tmp`` beside ``path``, flushes it to disk, then renames it over ``path`` and flushes
    the folder: a kill mid-save never truncates a checkpoint, and a node that loses power right after a save
    does not come back with an empty ``last.ckpt`` (a rename can reach the disk before the file's data). A
    save that fails leaves the previous checkpoint and no temporary file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

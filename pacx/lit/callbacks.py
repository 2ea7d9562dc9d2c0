"""Callbacks shared by the stages: the run record (``run.json``), MAE reconstruction grids, embedding export.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torchvision.utils import make_grid, save_image

from pacx.constants import IMAGENET_MEAN, IMAGENET_STD
from pacx.debug import debug_flags
from pacx.lit.resilience import RunRequeued
from pacx.utils import git_sha, save_npy_atomic, write_json_atomic

log = logging.getLogger(__name__)


class RunRecord(Callback):
    """Keeps ``<run_dir>/run.json`` current: stage, status, attempt, debug flags, checkpoints, git sha,
    config.

    Status: ``running``, then ``final_status`` when fit ends (``completed``; Stage 3 writes ``trained`` and
    ``completed`` after its test), ``requeued`` (SLURM), ``interrupted``, ``killed: SIGTERM`` or
    ``failed: <exception>``. A ``kill -9`` leaves ``running``; the record names the process (``pid``,
    ``host``) so :func:`pacx.run_record.read_run_record` reports such a run as ``killed``.

    ``attempt`` counts the ``fit`` commands of this run directory (1, then 2 after a resume, …); the CSV
    log's rows carry the same number. ``debug`` holds the Lightning debug flags of every attempt
    (:mod:`pacx.debug`; ``{}`` for a normal run). Only ``fit`` writes the record: ``validate`` / ``test`` /
    ``predict`` into a run directory leave it as it is.

    The next stage (and ``pacx.load_encoder``) reads it to find this run's checkpoints.
    """

    def __init__(self, run_dir: str | Path, stage: str, config_path: str | None = None,
                 command: list[str] | None = None, final_status: str = "completed", attempt: int = 1,
                 subcommand: str = "fit") -> None:
        self.run_dir = Path(run_dir)
        self.final_status = final_status
        self.stage = stage
        self.config_path = config_path
        self.command = command
        self.attempt = attempt
        self.subcommand = subcommand
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")

    def _checkpoints(self, trainer: pl.Trainer) -> dict:
        out = {}
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                last = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
                if last.is_file():
                    out["last"] = str(last.resolve())
                if cb.best_model_path:
                    out["best"] = str(Path(cb.best_model_path).resolve())
                    score = cb.best_model_score
                    out["best_score"] = float(score) if score is not None else None
                    out["monitor"] = cb.monitor
        return out

    @rank_zero_only
    def write(self, trainer: pl.Trainer, status: str) -> None:
        if self.subcommand != "fit":
            return
        write_json_atomic(
            self.run_dir / "run.json",
            {
                "stage": self.stage,
                "status": status,
                "attempt": self.attempt,
                "debug": run_debug_flags(trainer),
                "run_dir": str(self.run_dir.resolve()),
                "checkpoints": self._checkpoints(trainer),
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "max_epochs": trainer.max_epochs,
                "world_size": trainer.world_size,
                "git_sha": git_sha(),
                "config": self.config_path,
                "command": self.command,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": self.started,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                # what the module adds (Stage 2: the hash and file of the admissions it trained on)
                **(getattr(trainer.lightning_module, "run_record_extra", None) or {}),
            },
        )

    def on_fit_start(self, trainer, pl_module) -> None:
        self.write(trainer, "running")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.write(trainer, "running")

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(trainer, "interrupted" if trainer.interrupted else self.final_status)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, RunRequeued):
            status = "requeued"
        elif isinstance(exception, KeyboardInterrupt):  # Ctrl-C: Lightning shuts down, then exits 1
            status = "interrupted"
        elif isinstance(exception, SIGTERMException):
            status = "killed: SIGTERM"
        else:
            status = f"failed: {exception.__class__.__name__}"
        self.write(trainer, status)


def run_debug_flags(trainer: pl.Trainer) -> dict:
    """The debug flags of the run ``trainer`` drives: the module's (those of the checkpoint it resumed
    from, plus this trainer's) when it is a pacx module, else this trainer's (:mod:`pacx.debug`)."""
    flags = getattr(trainer.lightning_module, "debug_flags", None)
    return dict(flags) if isinstance(flags, dict) else debug_flags(trainer)


class ReconstructionGrid(Callback):
    """Every ``every_n_epochs``: a PNG grid of rows (original | masked | reconstruction) of fixed
    validation images, saved under ``<run_dir>/reconstructions/`` (``<run_dir>/validate/reconstructions/``
    for ``validate``) and sent to image-capable loggers."""

    def __init__(self, every_n_epochs: int = 10, num_images: int = 8) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self._images: torch.Tensor | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        if batch_idx == 0 and self._images is None:
            self._images = batch[0][: self.num_images].detach().cpu()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        # max_epochs is -1 when only max_steps bounds the run
        last_epoch = (0 < (trainer.max_epochs or 0) <= epoch + 1
                      or 0 < trainer.max_steps <= trainer.global_step)
        due = epoch % self.every_n_epochs == 0 or last_epoch
        if self._images is None or trainer.sanity_checking or not due:
            return
        # trainer.log_dir is a collective under DDP: every rank asks, before the rank-zero-only save
        # (the logger's folder: the run directory for fit, <run_dir>/validate for validate; pacx.lit.history)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "reconstructions"
        path = self.save(trainer, pl_module, epoch, out_dir)
        if path is not None:
            log.info("reconstructions: %s", path)

    @rank_zero_only
    def save(self, trainer, pl_module, epoch: int, out_dir: Path) -> Path | None:
        imgs = self._images.to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        masked, recon = pl_module.reconstruct(imgs)
        pl_module.train(was_training)
        mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
        rows = torch.stack([imgs, masked, recon], dim=1).flatten(0, 1)  # [3B, C, H, W]
        rows = (rows * std + mean).clamp(0, 1).cpu()
        grid = make_grid(rows, nrow=3, padding=2, pad_value=1.0)
        path = out_dir / f"epoch{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/reconstructions", images=[str(path)], step=trainer.global_step)
        return path


class EmbeddingWriter(BasePredictionWriter):
    """Writes ``predict`` outputs (one ``[B, D]`` tensor per batch) as one float32 ``.npy`` ``[N, D]`` in
    dataset (manifest row) order, plus ``<stem>.csv`` (row, image path) and ``<stem>.json`` (source and
    backbone by file name, shape). Under DDP each rank writes a part with its dataset indices and rank 0
    assembles them.
    """

    def __init__(self, out: str | Path) -> None:
        super().__init__(write_interval="epoch")
        self.out = Path(out)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        preds = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        indices = batch_indices[0] if batch_indices and isinstance(batch_indices[0], list) else batch_indices
        emb = torch.cat(preds).numpy() if preds else np.zeros((0, pl_module.backbone.embed_dim), np.float32)
        idx = (np.concatenate([np.asarray(i, dtype=np.int64) for i in indices]) if indices
               else np.zeros(0, np.int64))
        if len(idx) != len(emb):
            raise RuntimeError(f"predict: {len(emb)} embeddings but {len(idx)} dataset indices")
        if trainer.world_size > 1:
            part = self.out.with_name(f"{self.out.stem}.part{trainer.global_rank}.npz")
            np.savez(part, index=idx, embedding=emb)
            trainer.strategy.barrier()
            if trainer.global_rank == 0:
                parts = [self.out.with_name(f"{self.out.stem}.part{r}.npz")
                         for r in range(trainer.world_size)]
                loaded = [np.load(p, allow_pickle=False) for p in parts]
                idx = np.concatenate([p["index"] for p in loaded])
                emb = np.concatenate([p["embedding"] for p in loaded])
                for p in parts:
                    p.unlink()
            trainer.strategy.barrier()
        if trainer.global_rank == 0:
            self._save(trainer, pl_module, idx, emb)

    def _save(self, trainer, pl_module, idx, emb) -> None:
        table = getattr(trainer.datamodule, "predict_table", None)
        n = len(table) if table is not None else int(idx.max()) + 1 if len(idx) else 0
        out = np.zeros((n, emb.shape[1]), dtype=np.float32)
        out[idx] = emb  # DistributedSampler pads with repeats: the same row gets the same value
        if len(np.unique(idx)) != n:
            raise RuntimeError(f"predict: embeddings cover {len(np.unique(idx))} of {n} manifest rows")
        save_npy_atomic(self.out, out)
        if table is not None:
            table.reset_index(drop=True).rename_axis("row").to_csv(self.out.with_suffix(".csv"))
        cfg = pl_module.backbone_cfg
        manifest = getattr(trainer.datamodule.hparams, "manifest", None)
        write_json_atomic(self.out.with_suffix(".json"), {  # names only: no absolute path of this machine
            "rows": n, "dim": int(out.shape[1]), "source": Path(manifest).name if manifest else None,
            "backbone_kind": cfg.kind, "backbone_weights": Path(cfg.weights).name if cfg.weights else None,
            "img_size": cfg.img_size, "git_sha": git_sha(),
        })
        log.info("wrote %d × %d embeddings to %s", n, out.shape[1], self.out)

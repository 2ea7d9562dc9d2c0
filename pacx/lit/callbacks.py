"""Callbacks shared by the stages: the run record (``run.json``) and MAE reconstruction grids."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from pacx.constants import IMAGENET_MEAN, IMAGENET_STD
from pacx.utils import git_sha, write_json_atomic

log = logging.getLogger(__name__)


class RunRecord(Callback):
    """Keeps ``<run_dir>/run.json`` current: stage, status, checkpoints, git sha, config, step.

    The next stage (and ``pacx.load_encoder``) reads it to find this run's checkpoints.
    """

    def __init__(self, run_dir: str | Path, stage: str, config_path: str | None = None,
                 command: list[str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.config_path = config_path
        self.command = command
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
                    out["best_score"] = float(cb.best_model_score) if cb.best_model_score is not None else None
                    out["monitor"] = cb.monitor
        return out

    @rank_zero_only
    def write(self, trainer: pl.Trainer, status: str) -> None:
        write_json_atomic(
            self.run_dir / "run.json",
            {
                "stage": self.stage,
                "status": status,
                "run_dir": str(self.run_dir.resolve()),
                "checkpoints": self._checkpoints(trainer),
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "max_epochs": trainer.max_epochs,
                "world_size": trainer.world_size,
                "git_sha": git_sha(),
                "config": self.config_path,
                "command": self.command,
                "started": self.started,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )

    def on_fit_start(self, trainer, pl_module) -> None:
        self.write(trainer, "running")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.write(trainer, "running")

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(trainer, "interrupted" if trainer.interrupted else "completed")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.write(trainer, f"failed: {exception.__class__.__name__}")


class ReconstructionGrid(Callback):
    """Every ``every_n_epochs``: a PNG grid of rows (original | masked | reconstruction) of fixed
    validation images, saved under ``<run_dir>/reconstructions/`` and sent to image-capable loggers."""

    def __init__(self, every_n_epochs: int = 10, num_images: int = 8) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self._images: torch.Tensor | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and self._images is None:
            self._images = batch[0][: self.num_images].detach().cpu()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        last_epoch = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if self._images is None or trainer.sanity_checking or not (epoch % self.every_n_epochs == 0 or last_epoch):
            return
        path = self.save(trainer, pl_module, epoch)
        if path is not None:
            log.info("reconstructions: %s", path)

    @rank_zero_only
    def save(self, trainer, pl_module, epoch: int) -> Path | None:
        from torchvision.utils import make_grid, save_image

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
        path = Path(trainer.default_root_dir) / "reconstructions" / f"epoch{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/reconstructions", images=[str(path)], step=trainer.global_step)
        return path

"""Learning-health callbacks: collapse alarms for Stage 2 and an online linear probe for any stage.

:class:`LearningHealth` logs ``val/infonce_frac_<pair>``, ``val/effective_rank`` and ``val/emb_std`` each
validation epoch and warns once per reason on collapse; :class:`OnlineLinearProbe` fits a logistic regression
on frozen features of a small labelled set (:mod:`pacx.data.probe`) and logs ``<prefix>online_probe_auroc``.
The numbers come from :mod:`pacx.eval.health`; thresholds: docs/method.md#learning-health.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

from pacx.data.probe import ProbeData
from pacx.eval.health import (
    CollapseMonitor,
    chance_fraction,
    effective_rank,
    embedding_std,
    linear_probe_auroc,
    preserved_rng,
)

log = logging.getLogger(__name__)


def health_readings(inputs: dict) -> dict[str, float]:
    """``health_inputs()`` -> ``{infonce_frac_<pair>, effective_rank, emb_std}``."""
    emb = inputs["embeddings"]
    out = {f"infonce_frac_{pair}": chance_fraction(float(loss), int(inputs["n_global"]))
           for pair, loss in inputs["infonce"].items()}
    out["effective_rank"] = effective_rank(emb)
    out["emb_std"] = embedding_std(emb)
    return out


class LearningHealth(Callback):
    """Collapse alarms for contrastive training (Stage 2).

    The module exposes ``health_inputs()``, called on every rank at each validation epoch end (before the
    module's own ``on_validation_epoch_end``, so it may still read and gather its validation outputs),
    returning ``None`` (nothing to check) or::

        {"embeddings": Tensor [N, D],          # CXR shared embeddings of the whole validation split
         "infonce": {"ecg": float, "labs": float},  # epoch-mean validation InfoNCE per pair
         "n_global": int}                      # keys per InfoNCE query (per-device batch x world size)

    The readings are logged under ``val/`` (rank zero), kept in :attr:`history` and checked by a
    :class:`~pacx.eval.health.CollapseMonitor` named after ``trainer.default_root_dir`` (warnings on rank
    zero only); the threshold arguments are the monitor's. The history and the reasons already warned about
    are saved in checkpoints, so a resumed run keeps its history and does not warn again.
    """

    def __init__(self, warmup_epochs: int = 2, chance_fraction: float = 0.98, std_factor: float = 0.1,
                 rank_fraction: float = 0.01, min_rank: float = 2.0) -> None:
        self.thresholds = dict(warmup_epochs=warmup_epochs, chance_fraction=chance_fraction,
                               std_factor=std_factor, rank_fraction=rank_fraction, min_rank=min_rank)
        self.monitor: CollapseMonitor | None = None
        self.history: list[dict] = []
        self._warned: set[str] = set()  # restored from a checkpoint before or after setup

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is None:
            self.monitor = CollapseMonitor(str(trainer.default_root_dir), **self.thresholds)
            self.monitor.warned |= self._warned

    def state_dict(self) -> dict:
        warned = self.monitor.warned if self.monitor is not None else self._warned
        return {"history": [dict(h) for h in self.history], "warned": sorted(warned)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._warned = set(state_dict.get("warned", []))
        if self.monitor is not None:
            self.monitor.warned |= self._warned

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not hasattr(pl_module, "health_inputs"):
            return
        inputs = pl_module.health_inputs()
        if inputs is None:
            return
        readings = health_readings(inputs)
        for name, value in readings.items():
            pl_module.log(f"val/{name}", value, rank_zero_only=True)
        epoch = trainer.current_epoch
        self.history.append({"epoch": epoch, **readings})
        if trainer.is_global_zero and self.monitor is not None:
            prefix = "infonce_frac_"
            fractions = {k.removeprefix(prefix): v for k, v in readings.items() if k.startswith(prefix)}
            self.monitor.update(epoch, fractions, readings["emb_std"], readings["effective_rank"],
                                int(inputs["embeddings"].shape[1]))


class OnlineLinearProbe(Callback):
    """Every ``every_n_epochs`` validation epochs (from epoch 0, and at the last): the AUROC of a linear
    probe on frozen features of ``data``, logged as ``<prefix>online_probe_auroc``.

    On rank zero only, outside the sanity check: features come from ``pl_module.<feature_fn>(x)``
    (default: ``probe_features`` if the module has it, else ``pl_module(x)``; a ``[B, T, D]`` output gives
    its CLS token) in eval mode without gradients, under the trainer's precision context, in batches of
    ``batch_size``; the module's train/eval mode is restored afterwards. Then
    :func:`pacx.eval.health.linear_probe_auroc` (``StandardScaler`` + ``LogisticRegression(C)``,
    stratified ``1 - test_size`` / ``test_size`` split seeded by ``seed``). The whole run sits inside
    :func:`~pacx.eval.health.preserved_rng`, so training draws the same random numbers with or without the
    probe. ``data`` loads once, at fit start (a bad path fails before training); it stays in CPU memory
    (``N x 3 x S x S`` float32: 0.6 GB for 1000 images at 224 px).
    """

    def __init__(self, data: ProbeData, every_n_epochs: int = 1, C: float = 1.0, test_size: float = 0.3,
                 seed: int = 0, feature_fn: str | None = None, batch_size: int = 64, max_iter: int = 1000,
                 prefix: str = "val/") -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.data = data
        self.every_n_epochs, self.C, self.test_size, self.seed = every_n_epochs, C, test_size, seed
        self.feature_fn, self.batch_size, self.max_iter = feature_fn, batch_size, max_iter
        self.prefix = prefix
        self.history: list[dict] = []
        self._images: torch.Tensor | None = None
        self._labels: np.ndarray | None = None

    def _load(self) -> None:
        if self._images is not None:
            return
        with preserved_rng():
            images, labels = self.data.load()
        if images.ndim != 4 or labels.shape != (len(images),):
            raise ValueError(f"probe data gave images {list(images.shape)} and labels {list(labels.shape)}; "
                             "expected [N, 3, H, W] and [N]")
        self._images, self._labels = images, labels.numpy().astype(np.int64)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._load()

    def _features_fn(self, pl_module: pl.LightningModule) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.feature_fn is not None:
            if not callable(getattr(pl_module, self.feature_fn, None)):
                raise AttributeError(f"OnlineLinearProbe: {type(pl_module).__name__} has no method "
                                     f"{self.feature_fn!r} (feature_fn)")
            return getattr(pl_module, self.feature_fn)
        return getattr(pl_module, "probe_features", pl_module)

    @torch.no_grad()
    def features(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> np.ndarray:
        """Frozen features [N, D] (float64) of the probe images."""
        fn = self._features_fn(pl_module)
        was_training = pl_module.training
        pl_module.eval()
        out = []
        try:
            for start in range(0, len(self._images), self.batch_size):
                x = self._images[start:start + self.batch_size].to(pl_module.device)
                with trainer.precision_plugin.forward_context():
                    f = fn(x)  # [B, D] or [B, T, D]
                out.append((f[:, 0] if f.ndim == 3 else f).double().cpu())
        finally:
            pl_module.train(was_training)
        return torch.cat(out).numpy()

    def probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """The AUROC of one probe run (global RNG states left untouched)."""
        self._load()
        with preserved_rng():
            feats = self.features(trainer, pl_module)
            return linear_probe_auroc(feats, self._labels, self.C, self.test_size, self.seed, self.max_iter)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        due = epoch % self.every_n_epochs == 0 or last
        if trainer.sanity_checking or not trainer.is_global_zero or not due:
            return
        auroc = self.probe(trainer, pl_module)
        pl_module.log(f"{self.prefix}online_probe_auroc", auroc, rank_zero_only=True)
        self.history.append({"epoch": epoch, "step": trainer.global_step, "auroc": auroc})
        rank_zero_info(f"online linear probe, epoch {epoch}: AUROC {auroc:.4f} on {len(self._labels)} images")

"""Stage 3 LightningModule: frozen-backbone segmentation (docs/datasets.md#segmentation).

Backbone (always frozen, kept in eval mode) → patch tokens after the final norm, CLS dropped, as
``[B, D, g, g]`` → :class:`pacx.models.seg_decoder.SegDecoder` → one logit channel at the input resolution.
Loss 1.0 × BCE + 1.0 × soft Dice; per-batch Dice / IoU, selection on ``val/dice``; ``test`` appends a results
row. A batch is the global batch: under DDP the batch statistics (soft Dice, Dice, IoU) sum over the ranks'
shares, so numbers do not depend on the number of devices. Formulas, optimizer and schedule:
docs/design.md#segmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from pacx.data.registry import get_benchmark
from pacx.dist import all_reduce_with_grad
from pacx.lit.common import BenchmarkEvalModule
from pacx.models.backbones import BackboneConfig
from pacx.models.seg_decoder import SegDecoder, tokens_to_map
from pacx.models.tuning import apply_tuning

log = logging.getLogger(__name__)

STAGE_SEGMENT = "stage3_segment"
EPS = 1e-6


def soft_dice_sums(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σp·y, Σp + Σy) per channel, sums over batch and pixels, p = sigmoid(logits); [B, C, H, W] -> [C]."""
    probs = torch.sigmoid(logits)
    dims = (0, 2, 3)
    return (probs * target).sum(dims), probs.sum(dims) + target.sum(dims)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """1 − mean over channels of (2Σp·y + ε) / (Σp + Σy + ε), sums over batch and pixels; [B, C, H, W].
    ``reduce`` maps the sums first (:func:`pacx.dist.all_reduce_with_grad`: over every rank's share)."""
    inter, denom = soft_dice_sums(logits, target)  # [C], [C]
    if reduce is not None:
        inter, denom = reduce(inter), reduce(denom)
    return 1 - ((2 * inter + EPS) / (denom + EPS)).mean()


def dice_iou_counts(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[I, |P|, |G|] of one batch: sigmoid > 0.5 against target > 0.5, counted over the whole batch and all
    pixels."""
    preds = (torch.sigmoid(logits) > 0.5).float()
    target = (target > 0.5).float()
    return torch.stack([(preds * target).sum(), preds.sum(), target.sum()])


def dice_iou_from_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU from ``[..., 3]`` counts ``[I, |P|, |G|]``."""
    inter, p, g = counts.unbind(-1)
    return (2 * inter + EPS) / (p + g + EPS), (inter + EPS) / (p + g - inter + EPS)


def dice_iou(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard Dice and IoU of one batch (docs/datasets.md#segmentation): sigmoid > 0.5, counts over the whole
    batch and all pixels."""
    return dice_iou_from_counts(dice_iou_counts(logits, target))


class SegmentationLoss(nn.Module):
    """``bce_weight`` × BCEWithLogits + ``dice_weight`` × soft Dice; returns the named terms and ``loss``."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
        dice = soft_dice_loss(logits, target, reduce)
        return {"bce": bce, "soft_dice": dice, "loss": self.bce_weight * bce + self.dice_weight * dice}


class SegmentationModule(BenchmarkEvalModule):
    """Frozen ViT backbone + convolutional decoder on one segmentation benchmark.

    Args:
        benchmark: registry name of a segmentation entry; linked from ``data.benchmark``.
        backbone: :class:`~pacx.models.backbones.BackboneConfig`, as for
            :class:`pacx.lit.classify.ClassificationModule`.
        decoder_width: channels after the decoder's 3×3 conv (256 in docs/datasets.md#stage-3-settings).
        bce_weight, dice_weight: loss weights (1.0 and 1.0 in docs/datasets.md#stage-3-settings).
        lr, weight_decay, betas: AdamW over the decoder (docs/datasets.md#stage-3-settings: 1e-4, 1e-4, (0.9,
            0.999)).
        warmup_epochs: linear warmup length (5 in docs/datasets.md#stage-3-settings); cosine to 0 afterwards.
        lr_interval: ``epoch`` holds each epoch's value of the curve for all of its steps, as the authors'
            per-epoch scheduler did (the Stage 3 config); ``step`` (default) evaluates it per optimizer step.
        results_csv: CSV that ``test`` appends a row to (default ``<default_root_dir>/results.csv``).
    """

    stage = STAGE_SEGMENT

    def __init__(
        self,
        benchmark: str,
        backbone: BackboneConfig,
        decoder_width: int = 256,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5.0,
        lr_interval: Literal["step", "epoch"] = "step",
        results_csv: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.spec = get_benchmark(benchmark)
        if self.spec.task != "segmentation":
            raise ValueError(f"{benchmark}: task {self.spec.task!r} is not segmentation")
        # per instance: the CLI's checkpoint callback reads it (docs/datasets.md#segmentation)
        self.monitor = ("val/dice", "max")
        self.init_backbone(backbone)
        apply_tuning(self.backbone, "linear_probe")
        self.backbone.eval()
        self.decoder = SegDecoder(self.backbone.embed_dim, self.backbone.cfg.patch_size, decoder_width)
        self.loss_fn = SegmentationLoss(bce_weight, dice_weight)
        # stage -> this rank's per-batch sums, in batch order: [rows, rows·BCE, I, |P|, |G|, Σp·y, Σp + Σy]
        self._batch_sums: dict[str, list[torch.Tensor]] = {}

    @property
    def eval_mode(self) -> str:
        return "frozen"

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """The frozen backbone stays in eval mode; Lightning toggles train/eval around validation."""
        self.backbone.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.backbone.forward_features(x)[:, 1:]  # [B, L, D], CLS dropped
        feature_map = tokens_to_map(tokens, self.backbone.cfg.grid_size)  # [B, D, g, g]
        return self.decoder(feature_map)  # [B, 1, H, W]

    def _shared_step(self, batch, stage: str, batch_idx: int) -> torch.Tensor:
        """The loss of the global batch this rank's share belongs to. In training the soft Dice reads the sums
        of every rank (differentiably: DDP's averaged gradient is the global batch's), logged per step; the
        epoch values come from :meth:`_log_batch_sums`. Validation and test make no per-step collective
        (their loaders may give one rank a batch more) and log at the epoch end only."""
        images, masks = batch  # [B, 3, H, W], [B, 1, H, W]
        logits = self(images).float()
        train = stage == "train"
        terms = self.loss_fn(logits, masks, all_reduce_with_grad if train else None)
        bs = images.shape[0]
        if train:
            self.log_stage(stage, terms, bs)
        with torch.no_grad():
            soft = torch.stack(soft_dice_sums(logits, masks)).sum(-1)  # [2] (one logit channel)
            sums = torch.cat([torch.stack([torch.tensor(float(bs), device=logits.device), terms["bce"] * bs]),
                              dice_iou_counts(logits, masks), soft])
        self._batch_sums.setdefault(stage, []).append(sums.double())
        return terms["loss"]

    def _global_batch_sums(self, stage: str) -> torch.Tensor:
        """``[K, 7]``: per batch index, the sums of every rank's batch of that index, i.e. of the global batch
        (the evaluation loaders give rank r the rows r, r + W, ..., the training sampler positions r, r + W,
        ... of the epoch's order, so the ranks' batches k make up the one-process batch k)."""
        rows = self._batch_sums.pop(stage, [])
        local = torch.stack(rows) if rows else torch.zeros(0, 7, dtype=torch.float64, device=self.device)
        if self.trainer.world_size == 1:
            return local
        most = int(self.all_gather(torch.tensor(len(local), device=self.device)).max())  # ranks may differ
        padded = torch.zeros(most, local.shape[1], dtype=local.dtype, device=self.device)
        padded[:len(local)] = local
        return self.all_gather(padded).sum(0)  # [W, K, 7] -> [K, 7]

    def _log_batch_sums(self, stage: str) -> None:
        """Per-batch Dice and IoU (and outside training BCE, soft Dice and the loss) of the global batches,
        weighted by their rows; the same value on every rank."""
        sums = self._global_batch_sums(stage)
        if not len(sums):
            return
        rows, bce, counts, soft = sums[:, 0], sums[:, 1], sums[:, 2:5], sums[:, 5:7]
        weight = rows / rows.sum()
        dice, iou = dice_iou_from_counts(counts)
        metrics = {"dice": dice, "iou": iou}
        if stage != "train":
            metrics["soft_dice"] = 1 - (2 * soft[:, 0] + EPS) / (soft[:, 1] + EPS)
            metrics["bce"] = bce / rows
            w_bce, w_dice = self.loss_fn.bce_weight, self.loss_fn.dice_weight
            metrics["loss"] = w_bce * metrics["bce"] + w_dice * metrics["soft_dice"]
        for name, per_batch in metrics.items():
            self.log(f"{stage}/{name}", (weight * per_batch).sum().float(), prog_bar=name == "dice",
                     sync_dist=True)  # equal on every rank already

    def on_train_epoch_start(self) -> None:
        self._batch_sums.pop("train", None)

    def on_validation_epoch_start(self) -> None:
        self._batch_sums.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._batch_sums.pop("test", None)

    def on_train_epoch_end(self) -> None:
        self._log_batch_sums("train")

    def on_validation_epoch_end(self) -> None:
        self._log_batch_sums("val")

    def on_test_epoch_end(self) -> None:
        self._log_batch_sums("test")

    def param_groups(self) -> list[dict]:
        """One AdamW group: the decoder, every parameter decayed (biases and norms too, as the reference)."""
        decoder = [p for p in self.parameters() if p.requires_grad]
        return [{"params": decoder, "weight_decay": self.hparams.weight_decay}]

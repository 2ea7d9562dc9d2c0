"""Stage 3 LightningModule: frozen-backbone segmentation (docs/datasets.md#segmentation).

Backbone (always frozen, kept in eval mode) → patch tokens after the final norm, CLS dropped, as
``[B, D, g, g]`` → :class:`pacx.models.seg_decoder.SegDecoder` → one logit channel at the input resolution.
Loss 1.0 × BCE + 1.0 × soft Dice; per-batch Dice / IoU, selection on ``val/dice``; ``test`` appends a results
row. Formulas, optimizer and schedule: docs/design.md#segmentation.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pacx.data.registry import get_benchmark
from pacx.lit.common import BenchmarkEvalModule
from pacx.models.backbones import BackboneConfig
from pacx.models.seg_decoder import SegDecoder, tokens_to_map
from pacx.models.tuning import apply_tuning

log = logging.getLogger(__name__)

STAGE_SEGMENT = "stage3_segment"
EPS = 1e-6


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − mean over channels of (2Σp·y + ε) / (Σp + Σy + ε), sums over batch and pixels; [B, C, H, W]."""
    probs = torch.sigmoid(logits)
    dims = (0, 2, 3)
    inter = (probs * target).sum(dims)  # [C]
    dice = (2 * inter + EPS) / (probs.sum(dims) + target.sum(dims) + EPS)
    return 1 - dice.mean()


def dice_iou(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard Dice and IoU of one batch (docs/datasets.md#segmentation): sigmoid > 0.5, counts over the whole
    batch and all pixels."""
    preds = (torch.sigmoid(logits) > 0.5).float()
    target = (target > 0.5).float()
    inter = (preds * target).sum()
    p, g = preds.sum(), target.sum()
    return (2 * inter + EPS) / (p + g + EPS), (inter + EPS) / (p + g - inter + EPS)


class SegmentationLoss(nn.Module):
    """``bce_weight`` × BCEWithLogits + ``dice_weight`` × soft Dice; returns the named terms and ``loss``."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
        dice = soft_dice_loss(logits, target)
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
        warmup_epochs: linear warmup length (5 in docs/datasets.md#stage-3-settings); cosine to 0 afterwards,
            stepped per optimizer step.
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
        images, masks = batch  # [B, 3, H, W], [B, 1, H, W]
        logits = self(images).float()
        terms = self.loss_fn(logits, masks)
        bs = images.shape[0]
        self.log_stage(stage, terms, bs)
        dice, iou = dice_iou(logits.detach(), masks)
        self.log_stage(stage, {"dice": dice, "iou": iou}, bs, prog_bar=("dice",), on_step=False)
        return terms["loss"]

    def param_groups(self) -> list[dict]:
        """One AdamW group: the decoder, every parameter decayed (biases and norms too, as the reference)."""
        decoder = [p for p in self.parameters() if p.requires_grad]
        return [{"params": decoder, "weight_decay": self.hparams.weight_decay}]

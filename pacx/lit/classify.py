"""Stage 3 LightningModule: linear probe / fine-tune classification (SPEC.md "Stage 3"; DATASETS.md §1, §15).

Backbone (:mod:`pacx.models.backbones`) → CLS feature [B, D] → ``Linear(D → C)`` head (no hidden layer, no
dropout). Task, number of outputs and the model-selection metric come from the benchmark's registry spec;
losses and metrics are small registries keyed by task (no branching on benchmark names):

* binary: BCEWithLogits; AUROC on sigmoid probabilities, acc / precision / recall / F1 at 0.5, logged as
  ``{split}/auroc`` … ; selection on ``val/auroc`` (max);
* multilabel: BCEWithLogits; macro AUROC and macro acc / precision / recall / F1 at 0.5;
* multiclass: CrossEntropy; one-vs-rest macro AUROC on softmax, macro metrics on argmax. Multi-output
  metrics are logged as ``{split}/auroc_macro`` … ; selection on ``val/auroc_macro`` (max).

Modes: ``linear_probe`` freezes the backbone and keeps it in eval mode while training; ``finetune`` trains
it at ``backbone_lr_scale`` (0.1) × lr. AdamW over four groups (head decay / head no-decay / backbone
decay / backbone no-decay; no decay on biases, norms and tokens).

Schedule difference from the reference: it steps a LambdaLR once per epoch (warmup (e+1)/warmup, then a
half cosine over the remaining epochs that never reaches 0 on the last epoch). Here the same warmup + cosine
shape is evaluated per optimizer step (:func:`pacx.optim.warmup_cosine`), so the lr decays smoothly within
epochs and reaches ~0 on the final step.

At the end of ``test`` one row is appended to a results CSV (``results_csv``, default
``<trainer.default_root_dir>/results.csv``): benchmark, backbone kind, mode, train fraction, seeds, every
``test/*`` metric, the paper metric's value (``metric_value``), weights path, git sha.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics import classification as tmc

from pacx.data.registry import get_benchmark
from pacx.lit.common import BenchmarkEvalModule
from pacx.optim import param_groups, schedule_lengths, warmup_cosine_scheduler

log = logging.getLogger(__name__)

STAGE_CLASSIFY = "stage3_classify"


# ---- per-task registries: loss, predictions, metrics, selection ----------------------------------------


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, target.float())  # [B, C] vs [B, C]


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, target.long())  # [B, C] vs [B]


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "binary": _bce, "multilabel": _bce, "multiclass": _ce,
}

# task -> logits, target -> (probabilities, integer target) in the shapes the task's metrics expect.
PREDICTIONS: dict[str, Callable] = {
    "binary": lambda logits, y: (torch.sigmoid(logits[:, 0]), y[:, 0].long()),  # [B], [B]
    "multilabel": lambda logits, y: (torch.sigmoid(logits), y.long()),  # [B, C], [B, C]
    "multiclass": lambda logits, y: (torch.softmax(logits, dim=-1), y.long()),  # [B, C], [B]
}


def _binary_metrics(num_outputs: int) -> dict:
    return {"auroc": tmc.BinaryAUROC(), "acc": tmc.BinaryAccuracy(), "precision": tmc.BinaryPrecision(),
            "recall": tmc.BinaryRecall(), "f1": tmc.BinaryF1Score()}


def _multilabel_metrics(n: int) -> dict:
    kw = {"num_labels": n, "average": "macro"}
    return {"auroc_macro": tmc.MultilabelAUROC(**kw), "acc_macro": tmc.MultilabelAccuracy(**kw),
            "precision_macro": tmc.MultilabelPrecision(**kw), "recall_macro": tmc.MultilabelRecall(**kw),
            "f1_macro": tmc.MultilabelF1Score(**kw)}


def _multiclass_metrics(n: int) -> dict:
    kw = {"num_classes": n, "average": "macro"}
    return {"auroc_macro": tmc.MulticlassAUROC(**kw), "acc_macro": tmc.MulticlassAccuracy(**kw),
            "precision_macro": tmc.MulticlassPrecision(**kw), "recall_macro": tmc.MulticlassRecall(**kw),
            "f1_macro": tmc.MulticlassF1Score(**kw)}


METRICS: dict[str, Callable[[int], dict]] = {
    "binary": _binary_metrics, "multilabel": _multilabel_metrics, "multiclass": _multiclass_metrics,
}
# task -> suffix of the logged metric names (binary ``val/auroc``; multi-output ``val/auroc_macro``)
METRIC_SUFFIX: dict[str, str] = {"binary": "", "multilabel": "_macro", "multiclass": "_macro"}


def metric_key(spec, split: str, metric: str | None = None) -> str:
    """The logged name of ``metric`` (default: the spec's paper metric) on ``split``, e.g. ``test/f1_macro``."""
    return f"{split}/{metric or spec.metric}{METRIC_SUFFIX[spec.task]}"


# mode -> whether the backbone trains
BACKBONE_TRAINS: dict[str, bool] = {"linear_probe": False, "finetune": True}


class ClassificationModule(BenchmarkEvalModule):
    """Linear probe or fine-tune of a ViT backbone on one classification benchmark.

    Args:
        benchmark: registry name; linked from ``data.benchmark`` by ``Stage3_eval.py``.
        backbone_kind: ``random | weights | mae | pacx | imagenet`` (:data:`pacx.models.backbones.BACKBONES`).
        backbone_weights: file or run directory for every kind but ``random``.
        backbone_arch: named ViT; required for ``random``, otherwise forces the file's architecture.
        img_size: input size the backbone is built for.
        mode: ``linear_probe`` (frozen backbone, kept in eval mode) or ``finetune``.
        lr: head lr (DATASETS.md §15, per benchmark in the configs); backbone at ``backbone_lr_scale`` × lr.
        weight_decay, betas: AdamW (no decay on biases, norms, tokens).
        warmup_epochs: linear warmup length; cosine to 0 afterwards, stepped per optimizer step.
        results_csv: CSV that ``test`` appends a row to (default ``<default_root_dir>/results.csv``).
    """

    stage = STAGE_CLASSIFY

    def __init__(
        self,
        benchmark: str,
        backbone_kind: str = "mae",
        backbone_weights: str | None = None,
        backbone_arch: str | None = None,
        img_size: int = 224,
        mode: Literal["linear_probe", "finetune"] = "linear_probe",
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 0.0,
        backbone_lr_scale: float = 0.1,
        results_csv: str | None = None,
    ) -> None:
        from pacx.models.backbones import BackboneConfig, build_backbone

        super().__init__()
        self.save_hyperparameters()
        if mode not in BACKBONE_TRAINS:
            raise ValueError(f"mode {mode!r} not in {sorted(BACKBONE_TRAINS)}")
        self.spec = get_benchmark(benchmark)
        task = self.spec.task
        if task not in LOSSES:
            raise ValueError(f"{benchmark}: task {task!r} is not a classification task ({sorted(LOSSES)})")
        # per instance: the CLI's checkpoint callback reads it (DATASETS.md §1.4 model selection)
        self.monitor = (metric_key(self.spec, "val", "auroc"), "max")
        self.loss_fn = LOSSES[task]
        self.predict_fn = PREDICTIONS[task]
        self.backbone = build_backbone(BackboneConfig(backbone_kind, backbone_weights, backbone_arch, img_size))
        self.head = nn.Linear(self.backbone.embed_dim, self.spec.num_outputs)
        self.backbone_trains = BACKBONE_TRAINS[mode]
        self.backbone.requires_grad_(False)
        if self.backbone_trains:
            for name, p in self.backbone.named_parameters():
                p.requires_grad_(name != "pos_embed")  # the sin-cos positions stay fixed
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        log.info("%s: %s of %s parameters trainable", mode, f"{trainable:,}", f"{total:,}")
        metrics = MetricCollection(METRICS[task](self.spec.num_outputs))
        for split in ("train", "val", "test"):  # one clone per split, e.g. self.val_metrics
            setattr(self, f"{split}_metrics", metrics.clone(prefix=f"{split}/"))

    def pacx_metadata(self) -> dict:
        h = self.hparams
        return {"vit_config": self.backbone.cfg.to_dict(), "benchmark": h.benchmark, "mode": h.mode,
                "backbone_kind": h.backbone_kind, "backbone_weights": h.backbone_weights}

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Linear probing keeps the frozen backbone in eval mode. Lightning sets and restores train/eval
        per submodule around validation, so this is re-applied before every training batch."""
        if not self.backbone_trains:
            self.backbone.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone_trains:
            features = self.backbone(x)
        else:
            with torch.no_grad():
                features = self.backbone(x)  # [B, D]
        return self.head(features)  # [B, C]

    def _shared_step(self, batch, stage: str, batch_idx: int) -> torch.Tensor:
        images, target = batch
        logits = self(images)
        loss = self.loss_fn(logits, target)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=stage != "train", batch_size=images.shape[0],
                 on_step=stage == "train", on_epoch=True)
        probs, labels = self.predict_fn(logits.detach().float(), target)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(probs, labels)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=images.shape[0])
        return loss

    def optimizer_groups(self) -> list[dict]:
        """Four AdamW groups (DATASETS.md §15); empty groups (the backbone's in LP) are left out."""
        h = self.hparams
        groups = []
        for part, module, lr in (("head", self.head, h.lr), ("backbone", self.backbone, h.lr * h.backbone_lr_scale)):
            for group in param_groups(module.named_parameters(), h.weight_decay):
                suffix = "decay" if group["weight_decay"] else "no_decay"
                groups.append({**group, "lr": lr, "name": f"{part}_{suffix}"})
        return groups

    def configure_optimizers(self):
        h = self.hparams
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)
        steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        warmup, total = schedule_lengths(total, steps_per_epoch, h.warmup_epochs)
        optimizer = torch.optim.AdamW(self.optimizer_groups(), lr=h.lr, betas=tuple(h.betas))
        log.info("AdamW head lr %.4g, backbone lr %s, warmup %d of %d steps", h.lr,
                 f"{h.lr * h.backbone_lr_scale:.4g}" if self.backbone_trains else "frozen", warmup, total)
        scheduler = warmup_cosine_scheduler(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- results row (BenchmarkEvalModule) ------------------------------------------------------

    def row_fields(self) -> dict:
        dm_h = getattr(getattr(self.trainer, "datamodule", None), "hparams", {})
        return {"mode": self.hparams.mode, "train_fraction": dm_h.get("train_fraction"),
                "subset_seed": dm_h.get("subset_seed")}

    def paper_metric_key(self) -> str:
        return metric_key(self.spec, "test")

"""Stage 3 LightningModule: linear probe / fine-tune classification (docs/method.md#stage-3).

Backbone (:mod:`pacx.models.backbones`) → CLS feature [B, D] → ``Linear(D → C)``. Task, outputs and the
selection metric come from the benchmark's registry spec, losses and metrics from small registries keyed by
task (docs/datasets.md#metrics). A linear probe trains on cached features by default (``feature_cache``:
:data:`FEATURE_CACHE_MODES`); ``test`` appends a results row. Details: docs/design.md#classification.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics import classification as tmc

from pacx.data.feature_cache import (
    FLIP_PAIR,
    FeatureCache,
    cached_features,
    extract_features,
    feature_key,
    images_fingerprint,
)
from pacx.data.registry import get_benchmark
from pacx.lit.common import BenchmarkEvalModule
from pacx.models.backbones import BackboneConfig
from pacx.models.heads import FeatureNorm
from pacx.models.tuning import apply_tuning
from pacx.optim import param_groups

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


class ClassCounts(Metric):
    """Rows and positives per class over an epoch (summed over devices): which classes of a split have no
    positive or no negative row, whose AUROC torchmetrics scores 0 (docs/datasets.md#metrics)."""

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("positives", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """``labels`` as PREDICTIONS gives them: [B] (binary 0/1, multiclass indices) or [B, C]
        (multilabel)."""
        if labels.ndim == 2:
            positives = (labels == 1).sum(0)
        elif probs.ndim == 2:  # multiclass: class indices
            positives = torch.bincount(labels, minlength=self.num_classes)
        else:
            positives = (labels == 1).sum().reshape(1)
        self.positives += positives.to(self.positives)
        self.rows += labels.shape[0]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.positives, self.rows


def metric_key(spec, split: str, metric: str | None = None) -> str:
    """The logged name of ``metric`` (default: the spec's paper metric) on ``split``, e.g. ``test/f1_macro``
    (:meth:`pacx.data.registry.BenchmarkSpec.metric_column`)."""
    return spec.metric_column(metric, split)


# mode -> whether the backbone trains
BACKBONE_TRAINS: dict[str, bool] = {"linear_probe": False, "finetune": True}
# feature_cache value -> the cache used by a linear probe (None: the backbone runs every epoch). ``true`` is
# the default cache, which is flip-aware; ``false`` turns caching off.
FEATURE_CACHE_MODES: dict[str | bool, str | None] = {"flip": "flip", "plain": "plain", True: "flip",
                                                     False: None}


class ClassificationModule(BenchmarkEvalModule):
    """Linear probe or fine-tune of a ViT backbone on one classification benchmark.

    Args:
        benchmark: registry name; linked from ``data.benchmark`` by ``Stage3_eval.py``.
        backbone: :class:`~pacx.models.backbones.BackboneConfig`: ``kind``
            (``random | weights | mae | pacx | imagenet``), ``weights`` (file or run directory, every kind but
            ``random``), ``arch`` (required for ``random``, otherwise forces the file's architecture),
            ``img_size`` (linked from ``data.img_size``). On the command line:
            ``--model.backbone.kind pacx --model.backbone.weights …``.
        mode: ``linear_probe`` (frozen backbone, kept in eval mode) or ``finetune``.
        lr: head lr (docs/datasets.md#stage-3-settings, per benchmark in the configs); backbone at
            ``backbone_lr_scale`` × lr.
        weight_decay, betas: AdamW (no decay on biases, norms, tokens).
        warmup_epochs: linear warmup length; cosine to 0 afterwards.
        lr_interval: ``epoch`` holds each epoch's value of the warmup + cosine curve for all of its steps, as
            the authors' per-epoch scheduler did (the Stage 3 configs, docs/datasets.md#stage-3-settings);
            ``step`` (default) evaluates the curve per optimizer step
            (:func:`pacx.optim.warmup_cosine_scheduler`).
        feature_cache: in ``linear_probe`` mode, compute each split's frozen features once (deterministic
            evaluation transform) and train the head on them (:mod:`pacx.data.feature_cache`): ``flip``
            (default; ``true`` means the same) also caches the flipped train images and draws the train flip
            per sample and epoch as the image path does; ``plain`` trains without the flip; ``false`` runs the
            backbone on every batch of every epoch, as the reference does.
        feature_cache_dir: where the features are kept (default ``<default_root_dir>/feature_cache``); the
            key covers weights, architecture, images, transform and precision, so runs may share one
            directory.
        feature_batch_size: per-device batch of the one-off feature extraction.
        head_norm: put a non-affine BatchNorm (:class:`~pacx.models.heads.FeatureNorm`) before the linear
            head, as MAE's linear-probe protocol does (He et al. 2022); the reference's head (default) is
            the bare ``Linear``.
        results_csv: CSV that ``test`` appends a row to (default ``<default_root_dir>/results.csv``).
    """

    stage = STAGE_CLASSIFY

    def __init__(
        self,
        benchmark: str,
        backbone: BackboneConfig,
        mode: Literal["linear_probe", "finetune"] = "linear_probe",
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 0.0,
        backbone_lr_scale: float = 0.1,
        lr_interval: Literal["step", "epoch"] = "step",
        feature_cache: Literal["flip", "plain"] | bool = "flip",
        feature_cache_dir: str | None = None,
        feature_batch_size: int = 256,
        head_norm: bool = False,
        results_csv: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        if mode not in BACKBONE_TRAINS:
            raise ValueError(f"mode {mode!r} not in {sorted(BACKBONE_TRAINS)}")
        self.spec = get_benchmark(benchmark)
        task = self.spec.task
        if task not in LOSSES:
            raise ValueError(f"{benchmark}: task {task!r} is not a classification task ({sorted(LOSSES)})")
        # per instance: the CLI's checkpoint callback reads it (docs/datasets.md#metrics model selection)
        self.monitor = (metric_key(self.spec, "val", "auroc"), "max")
        self.loss_fn = LOSSES[task]
        self.predict_fn = PREDICTIONS[task]
        self.init_backbone(backbone)
        linear = nn.Linear(self.backbone.embed_dim, self.spec.num_outputs)
        # MAE's linear-probe protocol standardises the frozen features with a non-affine BatchNorm
        self.head = nn.Sequential(FeatureNorm(self.backbone.embed_dim), linear) if head_norm else linear
        self.backbone_trains = BACKBONE_TRAINS[mode]
        if feature_cache not in FEATURE_CACHE_MODES:
            raise ValueError(f"feature_cache {feature_cache!r} not in flip | plain | true | false")
        self.cache_mode = None if self.backbone_trains else FEATURE_CACHE_MODES[feature_cache]
        self.uses_feature_cache = self.cache_mode is not None
        self.features_served = False  # set once the data module yields cached features
        apply_tuning(self.backbone, mode)  # finetune: all but the fixed sin-cos positions train
        metrics = MetricCollection(METRICS[task](self.spec.num_outputs))
        for split in ("train", "val", "test"):  # one clone per split, e.g. self.val_metrics
            setattr(self, f"{split}_metrics", metrics.clone(prefix=f"{split}/"))
        for split in ("val", "test"):  # e.g. self.val_label_counts (classes lacking positives are named)
            setattr(self, f"{split}_label_counts", ClassCounts(self.spec.num_outputs))
        self._warned_single_class: set[str] = set()

    @property
    def eval_mode(self) -> str:
        return self.hparams.mode

    # ---- cached features (linear probe) ---------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Linear probing with the cache: have the data module serve features instead of images."""
        if not self.uses_feature_cache or self.features_served or stage == "predict":
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "serve_features"):
            raise TypeError("feature_cache needs a data module with serve_features(), got "
                            f"{type(datamodule).__name__}; set model.feature_cache false")
        datamodule.serve_features(self.split_features, flip=self.cache_mode == "flip")
        self.features_served = True

    def split_features(self, split: str, dataset, with_flip: bool = False) -> torch.Tensor:
        """Frozen CLS features ``[N, D]`` of one split's images (``[N, 2D]``, image | flipped image,
        ``with_flip``), from the cache or computed once."""
        trainer = self.trainer
        precision = str(trainer.precision)
        layout = (FLIP_PAIR,) if with_flip else ()
        # the weights do not fix the features alone: the architecture (e.g. LayerNorm eps) is keyed too
        key = feature_key(self.backbone_fingerprint, f"vit={sorted(self.backbone.cfg.to_dict().items())}",
                          f"pool={self.backbone.pool}",
                          images_fingerprint(dataset.image_root, dataset.paths, dataset.transform), precision,
                          *layout)
        root = self.hparams.feature_cache_dir or str(Path(trainer.default_root_dir) / "feature_cache")
        record = {"split": split, "benchmark": self.hparams.benchmark, "source": dataset.source,
                  "backbone_kind": self.backbone_cfg.kind, "backbone_weights": self.backbone_cfg.weights,
                  "pool": self.backbone.pool, "precision": precision, "flip_pair": with_flip}
        num_workers = getattr(trainer.datamodule, "hparams", {}).get("num_workers", 0)

        def compute(indices):
            return extract_features(self.backbone, dataset, self.hparams.feature_batch_size, self.device,
                                    num_workers, trainer.precision_plugin.forward_context, indices, with_flip)

        dim = self.backbone.embed_dim * (2 if with_flip else 1)
        return cached_features(FeatureCache(root), key, len(dataset), dim, compute, record,
                               trainer.global_rank, trainer.world_size, trainer.strategy.barrier)

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
        inputs, target = batch  # images [B, 3, H, W], or cached features [B, D]
        logits = self.head(inputs) if self.features_served else self(inputs)
        loss = self.loss_fn(logits, target)
        self.log_stage(stage, {"loss": loss}, inputs.shape[0])
        probs, labels = self.predict_fn(logits.detach().float(), target)
        getattr(self, f"{stage}_metrics").update(probs, labels)
        if stage != "train":
            getattr(self, f"{stage}_label_counts").update(probs, labels)
        return loss

    def _log_epoch_metrics(self, stage: str) -> None:
        """Metrics over the whole epoch (docs/datasets.md#metrics), logged once per epoch: torchmetrics
        gathers the states across devices in ``compute``. (Logging the collection per step costs ~1 ms of
        Lightning bookkeeping per metric per step, most of a cached-feature epoch.)"""
        metrics = getattr(self, f"{stage}_metrics")
        self.log_dict(metrics.compute())
        metrics.reset()
        if stage != "train":
            self._warn_single_class(stage)

    def _warn_single_class(self, stage: str) -> None:
        """Warn (once per split) about the classes of ``stage`` that have no positive or no negative row:
        their AUROC is undefined, torchmetrics scores it 0, and the macro average keeps that 0, as the
        reference's did (docs/datasets.md#metrics)."""
        counts = getattr(self, f"{stage}_label_counts")
        if not counts.update_called:
            return
        positives, rows = counts.compute()  # every rank: a collective under DDP
        positives = positives.reshape(-1)  # torchmetrics squeezes a one-class count to 0-d
        counts.reset()
        sanity = self._trainer is not None and self._trainer.sanity_checking  # a few batches, not the split
        if sanity or self.global_rank != 0 or stage in self._warned_single_class or int(rows) == 0:
            return
        names = self.spec.labels if len(self.spec.labels) == len(positives) else self.spec.label_columns
        one_class = [f"{name!r} ({'no positive' if int(p) == 0 else 'no negative'})"
                     for name, p in zip(names, positives.tolist(), strict=True) if int(p) in (0, int(rows))]
        if one_class:
            self._warned_single_class.add(stage)
            log.warning("%s %s: %d of %d classes lack positive or negative rows among the split's %d, so "
                        "have no AUROC: torchmetrics scores them 0 and %s averages that 0 in: %s",
                        self.hparams.benchmark, stage, len(one_class), len(positives), int(rows),
                        metric_key(self.spec, stage, "auroc"), ", ".join(one_class))

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """The backbone's CLS feature ``[B, D]`` (float32) of each image: embeddings for ``predict``."""
        return self.backbone(batch[0]).float()

    def param_groups(self) -> list[dict]:
        """Four AdamW groups (docs/datasets.md#stage-3-settings); empty groups (the backbone's in LP) are left
        out."""
        h = self.hparams
        groups = []
        for part, module, lr in (("head", self.head, h.lr),
                                 ("backbone", self.backbone, h.lr * h.backbone_lr_scale)):
            for group in param_groups(module.named_parameters(), h.weight_decay):
                suffix = "decay" if group["weight_decay"] else "no_decay"
                groups.append({**group, "lr": lr, "name": f"{part}_{suffix}"})
        return groups

    # ---- results row (BenchmarkEvalModule) ------------------------------------------------------

    def row_fields(self) -> dict:
        dm = getattr(self.trainer, "datamodule", None)
        fraction = getattr(dm, "hparams", {}).get("train_fraction", 1.0)
        flip = getattr(dm, "hparams", {}).get("train_augment", False) and self.cache_mode != "plain"
        return {"train_fraction": fraction, "subset_seed": dm.subset_seed if fraction < 1.0 else None,
                "feature_cache": self.features_served, "train_flip": bool(flip)}

    def paper_metric_key(self) -> str:
        return metric_key(self.spec, "test")

"""Pieces every pacx LightningModule shares: stage stamps in checkpoints, debug marks, global batch, the
AdamW + warmup-cosine optimizer (with a :meth:`StagedModule.param_groups` hook) and stage-aware logging."""

from __future__ import annotations

import fcntl
import logging
import math
import os
from collections.abc import Collection, Mapping
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from pacx.data.resumable import GLOBAL_SEED_ENV
from pacx.debug import FROM_DEBUG_RUN, DebugInputs, debug_flags, describe, merge_flags
from pacx.models.backbones import as_backbone_config, build_backbone
from pacx.models.tuning import count_parameters
from pacx.optim import param_groups, resolve_lr, schedule_lengths, warmup_cosine_scheduler
from pacx.utils import git_sha
from pacx.weights.checkpoint import CheckpointError, state_fingerprint

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1


def global_batch_size(trainer: pl.Trainer) -> int:
    """Samples per optimizer step over all devices: per-device batch × world size × accumulation."""
    loader = trainer.train_dataloader
    per_device = getattr(loader, "batch_size", None)
    if per_device is None:
        raise RuntimeError("cannot read the per-device batch size from the train dataloader")
    return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches


class StagedModule(pl.LightningModule):
    """Base of the stage modules: stamps checkpoints with the stage and architecture, refuses others.

    Checkpoints also carry ``pacx.debug``: the Lightning debug flags (:mod:`pacx.debug`) of the run that
    wrote them and of every run they were resumed from (:attr:`debug_flags`).

    Subclasses set ``stage`` and ``monitor`` (metric, mode) and implement :meth:`_shared_step` (train,
    validation and test all go through it; it logs with :meth:`log_stage`) and :meth:`pacx_metadata`. The
    optimizer (:meth:`configure_optimizers`) reads the optimisation hyperparameters; subclasses that need
    other groups than decay / no-decay override :meth:`param_groups`.
    """

    stage: str = "unknown"
    monitor: tuple[str, str] = ("val/loss", "min")
    #: Whether a validation/test step runs collectives across ranks (a gather for a contrastive loss). Such
    #: a module needs every rank to run as many evaluation steps, so its loaders keep Lightning's padding
    #: sampler (which repeats a few rows); a module without them gets each evaluation row exactly once
    #: (:func:`pacx.data.common.eval_loader`), which data modules read from here.
    eval_step_collectives: bool = True

    def pacx_metadata(self) -> dict:
        return {}

    #: Debug flags this module inherits from its inputs (set by the CLI when ``--allow_debug`` let a debug
    #: run in as init weights or backbone: ``{"from_debug_run": 1}``).
    inherited_debug_flags: dict | None = None
    #: What the CLI's ``--allow_debug`` block sees while the subcommand runs (inputs loaded in ``setup``,
    #: such as on-the-fly teachers); any debug input let through there marks this run too.
    debug_inputs: DebugInputs | None = None

    @property
    def debug_flags(self) -> dict:
        """Debug flags of this run: inherited from debug inputs (at construction or while the subcommand
        runs), from the loaded checkpoint (a resumed or tested debug run stays one) and the attached
        trainer's; ``{}`` for a normal run."""
        trainer = self._trainer
        seen = self.debug_inputs
        later = {FROM_DEBUG_RUN: 1} if seen is not None and seen.let_through else None
        return merge_flags(self.inherited_debug_flags, later, getattr(self, "_loaded_debug_flags", None),
                           debug_flags(trainer) if trainer else None)

    def _shared_step(self, batch, stage: str, batch_idx: int) -> torch.Tensor:
        """The loss of one batch, with its named terms logged under ``{stage}/``."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train", batch_idx)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test", batch_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["pacx"] = {"stage": self.stage, "version": CHECKPOINT_FORMAT_VERSION,
                              **self.pacx_metadata(), "debug": self.debug_flags}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_stage(checkpoint, self.stage, "<checkpoint>")
        self._loaded_debug_flags = dict(checkpoint["pacx"].get("debug") or {})

    def log_stage(self, stage: str, metrics: Mapping[str, torch.Tensor | float], batch_size: int,
                  prog_bar: Collection[str] = ("loss",), on_step: bool | None = None) -> None:
        """Log each of ``metrics`` as ``{stage}/{name}``: per step (``on_step``, default: in training) and per
        epoch, weighted by ``batch_size``; the names in ``prog_bar`` also go to the progress bar.

        The epoch values are synchronised across devices: the mean over the whole epoch, every rank's rows.
        Per-step values are this rank's (no collective per training step). Lightning syncs a value logged
        per step and per epoch at every step or never, so under DDP the two go in as two entries, under the
        names Lightning gives them (``{stage}/{name}_step``, ``{stage}/{name}_epoch``).

        The batch size goes in as a float: Lightning keeps an integer row count otherwise, and synchronises it
        as the mean over ranks in integer arithmetic, which truncates whenever the ranks saw different
        numbers of rows (Stage 3's evaluation loaders: 9 rows on 2 ranks counted 8)."""
        step = stage == "train" if on_step is None else on_step
        ranks = self._trainer.world_size if self._trainer is not None else 1
        batch_size = float(batch_size)
        for name, value in metrics.items():
            key, bar = f"{stage}/{name}", name in prog_bar
            if not (step and ranks > 1):
                self.log(key, value, prog_bar=bar, on_step=step, on_epoch=True, sync_dist=not step,
                         batch_size=batch_size)
                continue
            self.log(f"{key}_step", value, prog_bar=bar, on_step=True, on_epoch=False, batch_size=batch_size)
            self.log(f"{key}_epoch", value, on_step=False, on_epoch=True, sync_dist=True,
                     batch_size=batch_size)

    def param_groups(self) -> list[dict]:
        """The AdamW parameter groups: by default decay / no-decay over the trainable parameters
        (:func:`pacx.optim.param_groups`). A group may set its own ``lr``; others get the effective lr."""
        return param_groups(self.named_parameters(), self.hparams.weight_decay)

    def configure_optimizers(self) -> dict:
        """AdamW over :meth:`param_groups` with a warmup + cosine schedule, from the hyperparameters: ``lr``
        or ``base_lr`` (:func:`pacx.optim.resolve_lr`), ``betas``, and warmup over ``warmup_epochs`` epochs or
        exactly ``warmup_steps`` optimizer steps, cosine down to ``min_lr_ratio`` (default 0). The lr follows
        the curve per optimizer step, or per epoch with ``lr_interval: epoch``
        (:func:`pacx.optim.warmup_cosine_scheduler`). ``fused_adamw`` (where a module takes it) picks
        ``AdamW(fused=True)``; unset, every stage fuses when all its parameters are on CUDA (the same update
        up to floating-point rounding, ``tests/lit/test_stage1.py``)."""
        h, trainer = self.hparams, self.trainer
        total = trainer.estimated_stepping_batches  # sets up the train dataloader, unless max_epochs is -1
        if not math.isfinite(total):
            raise ValueError("trainer.max_epochs is -1 and trainer.max_steps is -1: the warmup + cosine "
                             "schedule needs a finite length; set trainer.max_steps or trainer.max_epochs")
        total = int(total)
        if trainer.train_dataloader is None:  # max_epochs -1: Lightning returned max_steps without loading it
            trainer.fit_loop.setup_data()
        self.effective_lr = resolve_lr(h.get("lr"), h.get("base_lr"), global_batch_size(trainer))
        steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        warmup, total = schedule_lengths(total, steps_per_epoch, h.get("warmup_epochs", 0.0))
        if h.get("warmup_steps") is not None:
            warmup = h.warmup_steps
        min_lr_ratio, interval = h.get("min_lr_ratio", 0.0), h.get("lr_interval", "step")
        groups = self.param_groups()
        fused = h.get("fused_adamw")
        if fused is None:  # the fused kernel where it exists and is the faster path: every parameter on CUDA
            fused = all(p.is_cuda for g in groups for p in g["params"])
        # fused=None, not False, otherwise: False would also turn off the default multi-tensor path
        optimizer = torch.optim.AdamW(groups, lr=self.effective_lr, betas=tuple(h.betas), fused=fused or None)
        trainable, all_params = count_parameters(self)
        log.info("AdamW%s lr %.4g (global batch %d) over %s of %s parameters%s, warmup %d of %d steps, "
                 "floor %.3g, updated per %s", " (fused)" if fused else "", self.effective_lr,
                 global_batch_size(trainer), f"{trainable:,}", f"{all_params:,}",
                 "".join(f"; {g['name']} lr {g['lr']:.4g}" for g in groups if "name" in g and "lr" in g),
                 warmup, total, min_lr_ratio, interval)
        scheduler = warmup_cosine_scheduler(optimizer, warmup, total, min_lr_ratio, interval, steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TeacherModule(StagedModule):
    """Base of the teachers pacx trains itself (the Labs DAE, the demo ECG teacher):
    ``python -m pacx.teachers`` takes any subclass as ``model.class_path`` (:mod:`pacx.teacher_cli`);
    ``Stage2_PACX.py`` trains PaCX only."""


class BenchmarkEvalModule(StagedModule):
    """Base of the Stage 3 modules (``Stage3_eval.py`` takes any subclass as ``model.class_path``).

    It builds the backbone from its :class:`~pacx.models.backbones.BackboneConfig` (:meth:`init_backbone`,
    kept in the hyperparameters as a plain dict so checkpoints open with ``weights_only=True``), and at
    the end of ``test`` appends one row to a results CSV (``hparams.results_csv``, default
    ``<trainer.default_root_dir>/results.csv``) with the benchmark, the backbone, :meth:`row_fields`,
    every ``test/*`` metric, the paper metric's value, weights, git sha and ``debug`` (the debug flags as
    ``flag=value,…``; blank for a normal run, which ``scripts/make_tables.py`` requires).

    Subclasses call ``save_hyperparameters(ignore=["backbone"])`` and :meth:`init_backbone`, set
    ``self.spec`` (the registry entry) and implement :meth:`row_fields` and :meth:`paper_metric_key`.
    """

    #: Stage 3's overlap check of the test split against the backbone's Stage 2 admissions, set by the CLI
    #: (:func:`pacx.data.leakage.check_stage3_overlap`); written into the results row.
    leakage_fields: dict = {}

    def init_backbone(self, backbone) -> None:
        self.backbone_cfg = as_backbone_config(backbone)
        self.hparams["backbone"] = self.backbone_cfg.to_dict()
        self.backbone = build_backbone(self.backbone_cfg)

    @property
    def eval_mode(self) -> str:
        """How the backbone is used (``linear_probe``, ``finetune``, ``frozen``); recorded with results."""
        raise NotImplementedError

    @property
    def backbone_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    @property
    def backbone_fingerprint(self) -> str:
        """Hash of the backbone weights; computed once while the backbone is frozen (it cannot change)."""
        if not self.backbone_frozen:
            return state_fingerprint(self.backbone)
        if getattr(self, "_backbone_fingerprint", None) is None:
            self._backbone_fingerprint = state_fingerprint(self.backbone)
        return self._backbone_fingerprint

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A frozen backbone is left out of the checkpoint (it is the input weights, unchanged; a ViT-B would
        add 344 MB to every save); its fingerprint is kept so loading can check and restore it."""
        super().on_save_checkpoint(checkpoint)
        if self.backbone_frozen:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("backbone.")]:
                del state[key]
            checkpoint["pacx"]["frozen_backbone_fingerprint"] = self.backbone_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._trained_seed = checkpoint["pacx"].get("seed")  # the results row names the training's seed
        expected = checkpoint["pacx"].get("frozen_backbone_fingerprint")
        if expected is None:
            return
        if expected != self.backbone_fingerprint:
            raise CheckpointError(
                "this checkpoint was trained on a frozen backbone with other weights than "
                f"{self.backbone_cfg.kind} {self.backbone_cfg.weights}: build the module with the backbone "
                "it was trained on"
            )
        checkpoint["state_dict"].update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})

    def pacx_metadata(self) -> dict:
        return {"vit_config": self.backbone.cfg.to_dict(), "benchmark": self.hparams.benchmark,
                "mode": self.eval_mode, "backbone_kind": self.backbone_cfg.kind,
                "backbone_weights": self.backbone_cfg.weights, "seed": os.environ.get(GLOBAL_SEED_ENV)}

    def row_fields(self) -> dict:
        return {}

    def paper_metric_key(self) -> str:
        return f"test/{self.spec.metric}"

    def results_path(self) -> Path:
        if self.hparams.results_csv:
            return Path(self.hparams.results_csv)
        return Path(self.trainer.default_root_dir) / "results.csv"

    def results_seed(self) -> str | None:
        """The seed the tested head was trained with: the checkpoint's (``Stage3_eval.py test`` under another
        ``--seed_everything`` is warned about), else this process's."""
        trained, now = getattr(self, "_trained_seed", None), os.environ.get(GLOBAL_SEED_ENV)
        if trained is not None and now is not None and str(trained) != str(now):
            log.warning("testing a checkpoint trained with seed %s under seed %s: the results row records %s",
                        trained, now, trained)
        return trained if trained is not None else now

    def results_row(self) -> dict:
        h = self.hparams
        row = {"benchmark": h.benchmark, "task": self.spec.task, "metric": self.spec.metric,
               "backbone_kind": self.backbone_cfg.kind, "pool": self.backbone_cfg.pool,
               "mode": self.eval_mode, **self.row_fields(), "seed": self.results_seed(),
               **self.leakage_fields}
        for key, value in sorted(self.trainer.callback_metrics.items()):
            if key.startswith("test/"):
                row[key] = float(value)
        row["metric_value"] = row.get(self.paper_metric_key())
        row.update({"backbone_weights": self.backbone_cfg.weights, "git_sha": git_sha(),
                    "run_dir": str(self.trainer.default_root_dir), "debug": describe(self.debug_flags)})
        return row

    @rank_zero_only
    def on_test_end(self) -> None:
        path = self.results_path()
        append_results_row(path, self.results_row())
        log.info("appended a results row to %s", path)


def append_results_row(path: str | Path, row: dict) -> None:
    """Append ``row`` to the CSV at ``path`` (columns: the union, in first-seen order). Safe with concurrent
    writers (the tasks of a Slurm job array share one results CSV): an exclusive ``fcntl`` lock on
    ``<path>.lock`` serialises the read-concat-write, and the write goes through a temporary file and a
    rename, so readers never see a partial CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = pd.DataFrame([row])
        if path.is_file():
            table = pd.concat([pd.read_csv(path), table], ignore_index=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        table.to_csv(tmp, index=False)
        os.replace(tmp, path)


def check_checkpoint_stage(checkpoint: dict, stage: str, source: str) -> None:
    """Raise a clear error unless ``checkpoint`` is a pacx training checkpoint of ``stage``."""
    meta = checkpoint.get("pacx") if isinstance(checkpoint, dict) else None
    if not meta:
        raise CheckpointError(
            f"{source} is not a pacx {stage} training checkpoint (no 'pacx' stage stamp); to start from its "
            "weights use the stage's init option instead of --ckpt_path"
        )
    if meta.get("stage") != stage:
        raise CheckpointError(
            f"{source} is a {meta.get('stage')!r} checkpoint, but this run is {stage!r}: --ckpt_path resumes "
            "the same stage only; to initialise from another stage's output use its init option"
        )

"""Stage 2 LightningModule: PaCX cross-modal distillation (docs/method.md#stage-2).

Aligns the CXR encoder (from Stage 1, tuned by :func:`pacx.models.tuning.apply_tuning`) with the frozen
teachers named by ``teachers`` through :class:`pacx.losses.DistillationLoss`. Heads are ``nn.ModuleDict``s
keyed by teacher and batches are ``{"cxr": [B, 3, H, W], "teachers": {t: [B, D_t]}}``. Validation metrics,
old-config translation and the admissions record: docs/design.md#stage-2-module.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from pacx.constants import LORA_ALPHA, LORA_DROPOUT, LORA_R, LORA_TARGETS, STAGE_PACX
from pacx.data.leakage import record_stage2_admissions
from pacx.dist import gather_with_grad
from pacx.eval.retrieval import paired_topk
from pacx.lit.common import StagedModule
from pacx.lit.health import LearningHealth
from pacx.losses import DistillationLoss
from pacx.models.heads import FeatureNorm, ProjectionHead, TeacherNorm, upgrade_head_keys
from pacx.models.load import build_encoder
from pacx.models.tuning import apply_tuning
from pacx.models.vit import ViTEncoder, vit_config
from pacx.teachers import resolve_teachers, teacher_spec
from pacx.weights.checkpoint import CheckpointError
from pacx.weights.formats import read_encoder_weights

log = logging.getLogger(__name__)


def pair_cosines(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cosine of matching rows, mean cosine of non-matching rows)."""
    sim = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
    n = sim.shape[0]
    off = (sim.sum() - sim.diagonal().sum()) / max(1, n * n - n)
    return sim.diagonal().mean(), off


class PaCXModule(StagedModule):
    """Cross-modal distillation.

    Args:
        init_encoder: Stage 1 run directory, checkpoint or exported encoder (``None``: random init).
        encoder_arch / img_size / norm_eps: the encoder (``norm_eps`` 1e-6 as timm/MAE; the authors'
            Stage 2 encoder used 1e-5).
        tuning: ``lora`` | ``last_n_blocks`` | ``full``; LoRA rank/alpha/dropout/targets; blocks for
            ``last_n_blocks``.
        trainable_norms: with LoRA, which encoder LayerNorms train: ``all`` (the paper), ``final`` (only the
            final norm, as the authors' run) or ``none`` (:data:`pacx.models.tuning.TRAINABLE_NORMS`).
        teachers: the teachers distilled from, by registered name (``pacx.teachers.TEACHERS``); default
            ``[ecg, labs]`` (the paper). One teacher is the single-teacher ablation.
        teacher_dims: ``{teacher: feature width}`` where the feature files are not the registered width
            (e.g. the demo's 128-d ECG teacher); setup checks them against the files.
        shared_dim / head_dropout: heads.
        clip_weight / regression_weight / temperature / label_smoothing: the loss.
        ablate / ecg_dim / labs_dim: the earlier keys, translated (``ablate: ecg`` -> ``teachers: [labs]``;
            ``ecg_dim: 128`` -> ``teacher_dims: {ecg: 128}``) with a ``FutureWarning``.
        pool: the CXR feature the heads read: ``cls`` (the paper) or ``avg`` (mean patch token).
        head_norm: standardise the CXR feature (non-affine BatchNorm, :class:`FeatureNorm`) before the CXR
            heads; off in the paper.
        teacher_norm: how teacher embeddings enter the heads and the regression targets: ``raw`` (the
            paper), ``center`` (minus the train-split mean), ``standardize`` (per-dimension z-score) or
            ``whiten`` (PCA whitening onto the ``teacher_components`` leading components), all fitted on the
            train split's teacher features (:class:`~pacx.models.heads.TeacherNorm`: buffers saved with the
            checkpoint and applied identically in validation).
        teacher_components: with ``whiten``, how many components each teacher keeps (the teacher heads'
            input width and the regression target width).
        lr / base_lr / weight_decay / betas / warmup_epochs / min_lr_ratio: AdamW and the warmup + cosine
            schedule with a floor.
        lr_interval: ``step`` (the lr follows the schedule per optimizer step) or ``epoch`` (held within each
            epoch, as the authors' scheduler stepped; ``configs/stage2/pacx_vitb_symile_epoch_lr.yaml``).
    """

    stage = STAGE_PACX
    monitor = ("val/loss", "min")

    def __init__(
        self,
        init_encoder: str | None = None,
        encoder_arch: str = "vit_base_patch16",
        img_size: int = 224,
        norm_eps: float = 1e-6,
        tuning: Literal["lora", "last_n_blocks", "full"] = "lora",
        lora_r: int = LORA_R,
        lora_alpha: int = LORA_ALPHA,
        lora_dropout: float = LORA_DROPOUT,
        lora_targets: tuple[str, ...] = LORA_TARGETS,
        last_n_blocks: int = 4,
        trainable_norms: Literal["all", "final", "none"] = "all",
        teachers: list[str] | None = None,
        teacher_dims: dict[str, int] | None = None,
        shared_dim: int = 256,
        head_dropout: float = 0.2,
        clip_weight: float = 0.5,
        regression_weight: float = 1.0,
        temperature: float = 0.07,
        label_smoothing: float = 0.02,
        pool: Literal["cls", "avg"] = "cls",
        head_norm: bool = False,
        teacher_norm: Literal["raw", "center", "standardize", "whiten"] = "raw",
        teacher_components: int | None = None,
        lr: float | None = 1e-4,
        base_lr: float | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5,
        min_lr_ratio: float = 0.01,
        lr_interval: Literal["step", "epoch"] = "step",
        ablate: Literal["ecg", "labs"] | None = None,
        ecg_dim: int | None = None,
        labs_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.teacher_names, self.teacher_widths = translate_teacher_args(teachers, teacher_dims, ablate,
                                                                         ecg_dim, labs_dim)
        self.vit_cfg = vit_config(encoder_arch, img_size, norm_eps=norm_eps)
        encoder = self._initial_encoder(init_encoder).set_pool(pool)
        self.cxr_encoder = apply_tuning(encoder, tuning, lora_r, lora_alpha, lora_dropout, lora_targets,
                                        last_n_blocks, trainable_norms)
        d = self.vit_cfg.embed_dim
        widths = self.teacher_widths  # the teacher feature files'
        if (teacher_norm == "whiten") != (teacher_components is not None):
            raise ValueError("teacher_components goes with teacher_norm: whiten (and whiten needs it), got "
                             f"teacher_norm={teacher_norm!r}, teacher_components={teacher_components}")
        # what the heads see: the whitened components, or the full width
        head_dims = {t: min(w, teacher_components or w) for t, w in widths.items()}
        self.feat_norm = FeatureNorm(d) if head_norm else nn.Identity()
        # Built in this order (CXR projection, teacher projections, regressions) so that the heads draw their
        # initial weights from the random stream as before they were keyed by teacher: same seed, same run.
        self.proj = nn.ModuleDict({"cxr": ProjectionHead(d, shared_dim, head_dropout)})
        for t in self.teacher_names:
            self.proj[t] = ProjectionHead(head_dims[t], shared_dim, head_dropout)
        self.reg = nn.ModuleDict({t: ProjectionHead(d, head_dims[t], head_dropout)
                                  for t in self.teacher_names})
        # teacher_norm maps (identity until setup fits them on the train split)
        self.teacher_norms = nn.ModuleDict({t: TeacherNorm(widths[t], head_dims[t])
                                            for t in self.teacher_names})
        self.loss_fn = DistillationLoss(clip_weight, regression_weight, temperature, label_smoothing)
        self._val_outputs: list[dict[str, torch.Tensor]] = []
        self._val_clip: list[dict[str, float]] = []  # per validation batch: InfoNCE per pair and batch size
        self.stage2_admissions: dict | None = None  # set by setup("fit"): pacx.data.leakage record

    def _initial_encoder(self, path: str | None) -> ViTEncoder:
        if path is None:
            log.warning("init_encoder is not set: the CXR encoder starts from random weights")
            return ViTEncoder(self.vit_cfg)
        try:
            weights = read_encoder_weights(path)
            return build_encoder(weights, self.vit_cfg)
        except (CheckpointError, KeyError, ValueError) as err:
            raise CheckpointError(f"init_encoder {path}: does not fit the configured encoder "
                                  f"{self.hparams.encoder_arch} at {self.hparams.img_size} px: "
                                  f"{err}") from err

    def pacx_metadata(self) -> dict:
        h = self.hparams
        return {"vit_config": self.vit_cfg.to_dict(), "tuning": h.tuning, "lora_r": h.lora_r,
                "lora_alpha": h.lora_alpha, "trainable_norms": h.trainable_norms,
                "stage2_admissions": self.stage2_admissions}

    def forward(self, cxr: torch.Tensor) -> torch.Tensor:
        """The CXR feature [B, D]: the only thing that survives Stage 2."""
        return self.cxr_encoder(cxr)

    def setup(self, stage: str) -> None:
        """The heads must fit the teacher features on disk: an error naming the file otherwise. InfoNCE needs
        at least 2 pairs per global batch: a smaller ``data.batch_size`` is an error before training."""
        datamodule = getattr(self.trainer, "datamodule", None)
        batch = getattr(getattr(datamodule, "hparams", None), "batch_size", None)
        if stage == "fit" and batch is not None and batch < 2:
            raise ValueError(f"data.batch_size is {batch}: the contrastive loss needs at least 2 pairs per "
                             "global batch (each query's key and at least one negative)")
        widths = datamodule.feature_widths() if hasattr(datamodule, "feature_widths") else {}
        for t, (width, path) in widths.items():
            if t in self.teacher_widths and width != self.teacher_widths[t]:
                raise ValueError(f"{path}: {width}-wide teacher features, but the model expects "
                                 f"{self.teacher_widths[t]} for teacher {t!r}: set "
                                 f"model.init_args.teacher_dims {{{t}: {width}}}")
        if stage == "fit" and self.hparams.teacher_norm != "raw":
            # from the train split; a resumed run then restores the same buffers from its checkpoint
            for t, feats in datamodule.teacher_features("train").items():
                self.teacher_norms[t].fit(torch.from_numpy(feats), self.hparams.teacher_norm)
        # the admissions trained on, for Stage 3's overlap check (docs/datasets.md#leakage)
        if stage == "fit":
            self.stage2_admissions = record_stage2_admissions(self.trainer, datamodule)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints written before the heads were keyed by teacher load renamed (``proj_ecg.*`` ->
        ``proj.ecg.*``; an ``ablate`` run's untrained heads of the ablated teacher dropped):
        :func:`~pacx.models.heads.upgrade_head_keys`."""
        super().on_load_checkpoint(checkpoint)  # the stage check and the debug flags
        checkpoint["state_dict"] = upgrade_head_keys(checkpoint["state_dict"], self.teacher_names)

    @property
    def run_record_extra(self) -> dict:
        """Added to ``run.json``: the hash and file of the recorded Stage 2 admissions."""
        return {"stage2_admissions": self.stage2_admissions} if self.stage2_admissions else {}

    def embed(self, batch: dict) -> dict:
        """A batch ``{"cxr": [B, 3, H, W], "teachers": {t: [B, D_t]}}`` -> ``cxr_feat`` [B, D] (the
        encoder's), ``cxr_shared`` [B, S], and per teacher ``t``: ``target[t]`` (its embedding after
        ``teacher_norm``), ``shared[t]`` [B, S] (its projection) and ``pred[t]`` (the CXR regression onto
        ``target[t]``)."""
        cxr = batch["cxr"]
        feats = {}
        for t in self.teacher_names:
            x = batch["teachers"].get(t)
            if x is None:
                raise ValueError(f"the batch holds no features of teacher {t!r} (it has "
                                 f"{sorted(batch['teachers'])})")
            if x.shape[-1] != self.teacher_widths[t]:
                raise ValueError(f"{teacher_spec(t).title} teacher features are {x.shape[-1]}-wide but the "
                                 f"config expects {self.teacher_widths[t]}")
            feats[t] = x.to(cxr.dtype)  # teacher features as the model's inputs
        feat = self(cxr)
        head_in = self.feat_norm(feat)
        out = {"cxr_feat": feat, "cxr_shared": self.proj["cxr"](head_in), "shared": {}, "pred": {},
               "target": {t: self.teacher_norms[t](x) for t, x in feats.items()}}
        for t in self.teacher_names:  # this order of the heads' dropout draws is the one runs were made with
            out["shared"][t] = self.proj[t](out["target"][t])
            out["pred"][t] = self.reg[t](head_in)
        return out

    def loss_terms(self, batch: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """(:meth:`embed` of the batch, the :class:`~pacx.losses.DistillationLoss` terms on it)."""
        e = self.embed(batch)
        return e, self.loss_fn(e["cxr_shared"], e["shared"], e["pred"], e["target"])

    def _shared_step(self, batch, stage: str, batch_idx: int) -> torch.Tensor:
        e, terms = self.loss_terms(batch)
        bs = e["cxr_feat"].shape[0]
        self.log_stage(stage, terms, bs)
        if stage != "train":
            self._log_diagnostics(e, stage, bs)
            self._val_outputs.append({"cxr": e["cxr_shared"].detach(),
                                      **{t: v.detach() for t, v in e["shared"].items()}})
            self._val_clip.append({**{t: float(terms[f"clip_{t}"]) for t in self.teacher_names}, "n": bs})
        return terms["loss"]

    def configure_callbacks(self) -> list:
        """Stage 2 always reports its learning health (InfoNCE against chance, RankMe, collapse warnings)."""
        return [LearningHealth()]

    def health_inputs(self) -> dict | None:
        """What :class:`~pacx.lit.health.LearningHealth` reads at a validation epoch end (on every rank):
        the CXR shared embeddings of the split and each pair's mean InfoNCE over the full-size batches,
        whose chance value is exactly ``log(n_global)`` (the last, smaller batch would pull it lower)."""
        if not self._val_outputs or not self._val_clip:
            return None
        emb = self._split_rows(torch.cat([o["cxr"] for o in self._val_outputs]))
        full = max(c["n"] for c in self._val_clip)
        kept = [c for c in self._val_clip if c["n"] == full]
        infonce = {t: sum(c[t] for c in kept) / len(kept) for t in self.teacher_names}
        if self.trainer.world_size > 1:  # this rank's queries only: the split's is the mean over the ranks
            reduce = self.trainer.strategy.reduce
            infonce = {t: float(reduce(torch.tensor(v, device=self.device), reduce_op="mean"))
                       for t, v in infonce.items()}
        return {"embeddings": emb, "infonce": infonce, "n_global": full * self.trainer.world_size}

    def _split_rows(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's validation rows ``[n_local, ...]`` -> the whole split's, each row once, in split order.

        Under DDP, Lightning's ``DistributedSampler`` (no shuffle) pads the split to a multiple of the world
        size W by repeating its first rows and gives rank r the positions r, r + W, ...: the gathered
        ``[W, n_local, ...]`` is interleaved back and the padding cut, so that whole-split retrieval and the
        health readings see no duplicated pair."""
        if self.trainer.world_size == 1:
            return local
        rows = self.all_gather(local).transpose(0, 1).flatten(0, 1)
        sampler = getattr(self.trainer.val_dataloaders, "sampler", None)
        if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
            rows = rows[: len(sampler.dataset)]
        return rows

    def _log_diagnostics(self, e: dict, stage: str, bs: int) -> None:
        """The per-batch readings. Retrieval, cosines of negatives and the per-dimension std are read on the
        global batch, every rank's rows (the keys the InfoNCE scored), so they do not depend on the number
        of devices: on one rank's share, top-5 of a 4-row batch would be 1 by construction. Every rank
        then logs the same value, which the weighted epoch mean keeps."""
        cxr = gather_with_grad(e["cxr_shared"].detach())  # [W·n, S]; the identity on one device
        spread = cxr.shape[0] > 1  # a one-row batch (the last one can be) has no std over rows, no negatives
        stats = {"cxr_norm": e["cxr_shared"].norm(dim=-1).mean()}
        if spread:
            stats["cxr_std"] = cxr.float().std(0).mean()
        for t in self.teacher_names:
            shared = gather_with_grad(e["shared"][t].detach())  # [W·n, S], rows paired with cxr's
            for k, v in paired_topk(cxr, shared).items():
                stats[f"batch_top{k}_cxr_{t}"] = v
            pos, neg = pair_cosines(cxr, shared)
            stats[f"pos_cos_{t}"] = pos
            if spread:
                stats[f"neg_cos_{t}"] = neg
            stats[f"reg_cos_{t}"] = F.cosine_similarity(e["pred"][t].float(), e["target"][t].float()).mean()
            stats[f"{t}_norm"] = e["shared"][t].norm(dim=-1).mean()
            if spread:
                stats[f"{t}_std"] = shared.float().std(0).mean()
        self.log_stage(stage, stats, bs, prog_bar=())  # validation and test only: per epoch, synchronised

    def on_validation_epoch_start(self) -> None:
        self._val_outputs.clear()
        self._val_clip.clear()

    def on_validation_epoch_end(self) -> None:
        """Whole-split retrieval over every validation embedding (gathered across ranks)."""
        if not self._val_outputs or self.trainer.sanity_checking:
            self._val_outputs.clear()
            return
        cat = {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        self._val_outputs.clear()
        cat = {k: self._split_rows(v) for k, v in cat.items()}
        for t in self.teacher_names:
            for k, v in paired_topk(cat["cxr"], cat[t]).items():
                self.log(f"val/split_top{k}_cxr_{t}", v, rank_zero_only=True)


def translate_teacher_args(
    teachers: list[str] | None,
    teacher_dims: dict[str, int] | None,
    ablate: str | None = None,
    ecg_dim: int | None = None,
    labs_dim: int | None = None,
) -> tuple[tuple[str, ...], dict[str, int]]:
    """(teacher names, ``{teacher: feature width}``) of a Stage 2 config: widths default to the registered
    ones (``TeacherSpec.width``), overridden by ``teacher_dims``. The earlier keys are translated with a
    ``FutureWarning`` (docs/method.md#stage-2): ``ablate: ecg`` removes ``ecg`` from the teachers (``[labs]``
    with the defaults), ``ecg_dim`` / ``labs_dim`` -> ``teacher_dims: {ecg: ..., labs: ...}``."""
    names = resolve_teachers(teachers, ablate)
    if ablate is not None:
        warnings.warn(f"model.ablate is deprecated: ablate: {ablate} is read as teachers: {list(names)}; set "
                      "teachers instead", FutureWarning, stacklevel=3)
    dims = dict(teacher_dims or {})
    for t, legacy in (("ecg", ecg_dim), ("labs", labs_dim)):
        if legacy is None:
            continue
        warnings.warn(f"model.{t}_dim is deprecated: read as teacher_dims: {{{t}: {legacy}}}", FutureWarning,
                      stacklevel=3)
        if t not in names:  # the earlier configs set both widths, also when ablating one teacher
            continue
        if dims.setdefault(t, legacy) != legacy:
            raise ValueError(f"{t}_dim ({legacy}) and teacher_dims[{t!r}] ({dims[t]}) disagree: set "
                             "teacher_dims only")
    # widths of registered teachers not distilled from are kept out (configs stack), typos are not
    for t in dims:
        teacher_spec(t)
    return names, {t: int(dims.get(t, teacher_spec(t).width)) for t in names}

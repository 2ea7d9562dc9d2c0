"""Stage 2 LightningModule: PaCX cross-modal distillation (docs/method.md#stage-2; docs/datasets.md#stage-2-data, docs/datasets.md#stage-2-training).

The CXR encoder (initialised from Stage 1, tuned by :func:`pacx.models.tuning.apply_tuning`) is aligned
with frozen teacher embeddings (ECGFounder 1024-d, Labs DAE 256-d) by
:class:`pacx.losses.DistillationLoss`: InfoNCE in a shared 256-d space plus cosine regression onto
the teachers' own spaces. At inference only the encoder remains (exports merge LoRA).

Validation adds retrieval top-1/top-5 CXR→ECG and CXR→labs within each batch and over the whole split,
positive vs negative cosine, regression cosine, and the norm and per-dimension std of the embeddings
(a collapse alarm). Model selection on ``val/loss``.

A fit records the Symile admissions it trains and validates on in ``<run_dir>/stage2_admissions.npz`` (hash
in ``run.json`` and the checkpoints; :mod:`pacx.data.leakage`), so Stage 3 can refuse test splits that share them.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pacx.checkpoint import CheckpointError
from pacx.constants import ECG_EMBED_DIM, LABS_EMBED_DIM, STAGE_PACX
from pacx.data.leakage import record_stage2_admissions
from pacx.lit.common import StagedModule
from pacx.lit.health import LearningHealth
from pacx.losses import DistillationLoss
from pacx.models.heads import FeatureNorm, ProjectionHead, TeacherNorm
from pacx.models.tuning import apply_tuning
from pacx.models.vit import ViTEncoder, vit_config

log = logging.getLogger(__name__)

MODALITIES = ("ecg", "labs")


def retrieval_topk(query: torch.Tensor, keys: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, torch.Tensor]:
    """Fraction of queries whose own key (same row) ranks within the top k by cosine similarity."""
    sim = F.normalize(query.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T  # [N, N]
    rank = (sim > sim.diagonal()[:, None]).sum(dim=1)  # keys scoring strictly higher than the positive
    return {k: (rank < k).float().mean() for k in ks}


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
        shared_dim / ecg_dim / labs_dim / head_dropout: heads (teacher widths must match the features).
        clip_weight / regression_weight / temperature / label_smoothing / ablate: the loss.
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
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.1,
        lora_targets: tuple[str, ...] = ("qkv", "fc1", "fc2"),
        last_n_blocks: int = 4,
        trainable_norms: Literal["all", "final", "none"] = "all",
        shared_dim: int = 256,
        ecg_dim: int = ECG_EMBED_DIM,
        labs_dim: int = LABS_EMBED_DIM,
        head_dropout: float = 0.2,
        clip_weight: float = 0.5,
        regression_weight: float = 1.0,
        temperature: float = 0.07,
        label_smoothing: float = 0.02,
        ablate: Literal["ecg", "labs"] | None = None,
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vit_cfg = vit_config(encoder_arch, img_size, norm_eps=norm_eps)
        encoder = self._initial_encoder(init_encoder).set_pool(pool)
        self.cxr_encoder = apply_tuning(encoder, tuning, lora_r, lora_alpha, lora_dropout, lora_targets,
                                        last_n_blocks, trainable_norms)
        d = self.vit_cfg.embed_dim
        widths = {"ecg": ecg_dim, "labs": labs_dim}  # the teacher feature files'
        if (teacher_norm == "whiten") != (teacher_components is not None):
            raise ValueError("teacher_components goes with teacher_norm: whiten (and whiten needs it), got "
                             f"teacher_norm={teacher_norm!r}, teacher_components={teacher_components}")
        # what the heads see: the whitened components, or the full width
        teacher_dims = {m: min(w, teacher_components or w) for m, w in widths.items()}
        self.feat_norm = FeatureNorm(d) if head_norm else nn.Identity()
        self.proj_cxr = ProjectionHead(d, shared_dim, head_dropout)
        self.proj_ecg = ProjectionHead(teacher_dims["ecg"], shared_dim, head_dropout)
        self.proj_labs = ProjectionHead(teacher_dims["labs"], shared_dim, head_dropout)
        self.reg_ecg = ProjectionHead(d, teacher_dims["ecg"], head_dropout)
        self.reg_labs = ProjectionHead(d, teacher_dims["labs"], head_dropout)
        if ablate is not None:  # the ablated modality's heads stay in the checkpoint but never train
            for head in (getattr(self, f"proj_{ablate}"), getattr(self, f"reg_{ablate}")):
                head.requires_grad_(False)
        # teacher_norm maps (identity until setup fits them on the train split)
        self.teacher_norms = nn.ModuleDict({m: TeacherNorm(widths[m], teacher_dims[m]) for m in widths})
        self.loss_fn = DistillationLoss(clip_weight, regression_weight, temperature, label_smoothing, ablate)
        self._val_outputs: list[dict[str, torch.Tensor]] = []
        self._val_clip: list[dict[str, float]] = []  # per validation batch: InfoNCE per pair and batch size
        self.stage2_admissions: dict | None = None  # set by setup("fit"): pacx.data.leakage record

    def _initial_encoder(self, path: str | None) -> ViTEncoder:
        if path is None:
            log.warning("init_encoder is not set: the CXR encoder starts from random weights")
            return ViTEncoder(self.vit_cfg)
        from pacx.encoders import build_encoder, read_encoder_weights

        try:
            weights = read_encoder_weights(path)
            return build_encoder(weights, self.vit_cfg)
        except (CheckpointError, KeyError, ValueError) as err:
            raise CheckpointError(f"init_encoder {path}: does not fit the configured encoder "
                                  f"{self.hparams.encoder_arch} at {self.hparams.img_size} px: {err}") from err

    def pacx_metadata(self) -> dict:
        h = self.hparams
        return {"vit_config": self.vit_cfg.to_dict(), "tuning": h.tuning, "lora_r": h.lora_r,
                "lora_alpha": h.lora_alpha, "trainable_norms": h.trainable_norms,
                "stage2_admissions": self.stage2_admissions}

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m != self.hparams.ablate)

    def forward(self, cxr: torch.Tensor) -> torch.Tensor:
        """The CXR feature [B, D]: the only thing that survives Stage 2."""
        return self.cxr_encoder(cxr)

    def setup(self, stage: str) -> None:
        """The heads must fit the teacher features on disk: an error naming the file otherwise."""
        datamodule = getattr(self.trainer, "datamodule", None)
        widths = datamodule.feature_widths() if hasattr(datamodule, "feature_widths") else {}
        for key, hparam in (("ecg_features", "ecg_dim"), ("labs_features", "labs_dim")):
            if key in widths and widths[key][0] != self.hparams[hparam]:
                width, path = widths[key]
                raise ValueError(f"{path} holds {width}-wide teacher features but model.{hparam} is "
                                 f"{self.hparams[hparam]}: set model.init_args.{hparam} {width}")
        if stage == "fit" and self.hparams.teacher_norm != "raw":
            # from the train split; a resumed run then restores the same buffers from its checkpoint
            for m, feats in datamodule.teacher_features("train").items():
                self.teacher_norms[m].fit(torch.from_numpy(feats), self.hparams.teacher_norm)
        if stage == "fit":  # the admissions trained on, for Stage 3's overlap check (docs/datasets.md#leakage)
            self.stage2_admissions = record_stage2_admissions(self.trainer, datamodule)

    @property
    def run_record_extra(self) -> dict:
        """Added to ``run.json``: the hash and file of the recorded Stage 2 admissions."""
        return {"stage2_admissions": self.stage2_admissions} if self.stage2_admissions else {}

    def embed(self, batch) -> dict[str, torch.Tensor]:
        cxr = batch[0]
        ecg, labs = batch[1].to(cxr.dtype), batch[2].to(cxr.dtype)  # teacher features as the model's inputs
        for name, x, dim in (("ECG", ecg, self.hparams.ecg_dim), ("labs", labs, self.hparams.labs_dim)):
            if x.shape[-1] != dim:
                raise ValueError(f"{name} teacher features are {x.shape[-1]}-wide but the config expects {dim}")
        feat = self(cxr)
        head_in = self.feat_norm(feat)
        out = {"cxr_feat": feat, "cxr_shared": self.proj_cxr(head_in), "ecg_target": self.teacher_norms["ecg"](ecg),
               "labs_target": self.teacher_norms["labs"](labs)}
        for m in self.modalities:
            out[f"{m}_shared"] = getattr(self, f"proj_{m}")(out[f"{m}_target"])
            out[f"cxr_to_{m}"] = getattr(self, f"reg_{m}")(head_in)
        return out

    def _shared_step(self, batch, stage: str, batch_idx: int) -> torch.Tensor:
        e = self.embed(batch)
        terms = self.loss_fn(e["cxr_shared"], e.get("ecg_shared"), e.get("labs_shared"), e.get("cxr_to_ecg"),
                             e.get("cxr_to_labs"), e["ecg_target"], e["labs_target"])
        bs = e["cxr_feat"].shape[0]
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "loss", on_step=stage == "train", on_epoch=True,
                     sync_dist=stage != "train", batch_size=bs)
        if stage != "train":
            self._log_diagnostics(e, stage, bs)
            self._val_outputs.append({k: v.detach() for k, v in e.items() if k != "cxr_feat"})
            self._val_clip.append({**{m: float(terms[f"clip_{m}"]) for m in self.modalities}, "n": bs})
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
        emb = torch.cat([o["cxr_shared"] for o in self._val_outputs])
        if self.trainer.world_size > 1:
            emb = self.all_gather(emb).flatten(0, 1)
        full = max(c["n"] for c in self._val_clip)
        kept = [c for c in self._val_clip if c["n"] == full]
        infonce = {m: sum(c[m] for c in kept) / len(kept) for m in self.modalities}
        return {"embeddings": emb, "infonce": infonce, "n_global": full * self.trainer.world_size}

    def _log_diagnostics(self, e: dict[str, torch.Tensor], stage: str, bs: int) -> None:
        stats = {"cxr_norm": e["cxr_shared"].norm(dim=-1).mean(), "cxr_std": e["cxr_shared"].float().std(0).mean()}
        for m in self.modalities:
            for k, v in retrieval_topk(e["cxr_shared"], e[f"{m}_shared"]).items():
                stats[f"batch_top{k}_cxr_{m}"] = v
            stats[f"pos_cos_{m}"], stats[f"neg_cos_{m}"] = pair_cosines(e["cxr_shared"], e[f"{m}_shared"])
            stats[f"reg_cos_{m}"] = F.cosine_similarity(e[f"cxr_to_{m}"].float(), e[f"{m}_target"].float()).mean()
            stats[f"{m}_norm"] = e[f"{m}_shared"].norm(dim=-1).mean()
            stats[f"{m}_std"] = e[f"{m}_shared"].float().std(0).mean()
        for name, value in stats.items():
            self.log(f"{stage}/{name}", value, on_epoch=True, sync_dist=True, batch_size=bs)

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
        cat = {k: self.all_gather(v).flatten(0, 1) if self.trainer.world_size > 1 else v for k, v in cat.items()}
        for m in self.modalities:
            for k, v in retrieval_topk(cat["cxr_shared"], cat[f"{m}_shared"]).items():
                self.log(f"val/split_top{k}_cxr_{m}", v, rank_zero_only=True)

    def configure_optimizers(self):
        h = self.hparams
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        log.info("Stage 2 trains %s parameters (%d tensors)", f"{sum(p.numel() for _, p in trainable):,}",
                 len(trainable))
        return self.warmup_cosine_optimizer(h.lr, h.base_lr, h.weight_decay, h.betas, h.warmup_epochs,
                                            h.min_lr_ratio, lr_interval=h.get("lr_interval", "step"))

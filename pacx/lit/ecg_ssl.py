"""ECG SSL LightningModule: the demo's ECG teacher (docs/method.md#teachers), trained by ``pacx.teachers``:

    python -m pacx.teachers fit --config configs/demo/ecg_teacher.yaml --data.root <data_npy>
    python scripts/export_ecg_teacher.py <run_dir> ecg_teacher.safetensors

Trains :class:`~pacx.models.ecg_ssl.ECGContrastive` on ``ecg`` items (docs/design.md#demo-ecg-teacher).
"""

from __future__ import annotations

import torch

from pacx.lit.common import TeacherModule
from pacx.models.ecg_ssl import STAGE_ECG_SSL, ECGAugmentConfig, ECGContrastive
from pacx.models.ecgfounder import preprocess_ecg

_AUG = ECGAugmentConfig()  # the demo augmentation values, the defaults of the args below


def _filtered(raw: torch.Tensor) -> torch.Tensor:
    """Stored rows [B, 1, 5000, 12] -> the teacher's input [B, 12, 5000] float32 on the CPU, by the
    extraction's preprocessing, exactly."""
    return torch.from_numpy(preprocess_ecg(raw.detach().float().cpu().numpy()))


class ECGSSLModule(TeacherModule):
    """Args: ``arch``, an ECGFounder config name; the view augmentation (:class:`ECGAugmentConfig`:
    ``crop_samples``, ``scale_range``, ``noise_std``, ``wander_amp``, ``wander_hz``, ``lead_mask_prob``);
    the projection head widths and the InfoNCE ``temperature``; AdamW ``lr``, ``weight_decay``, ``betas``;
    ``warmup_steps`` of linear warmup, then cosine to 0 per optimizer step. Defaults are the demo values.

    ``cache_preprocessed``: keep each record's preprocessed signal (a deterministic function of the stored
    row, computed row by row) in memory after its first read, keyed by split and row, so later epochs only
    augment: the same inputs without re-filtering (the notch, band-pass and median filters cost about twice
    the demo network's training step). About 240 KB a record (12 × 5,000 float32)."""

    stage = STAGE_ECG_SSL
    monitor = ("val/loss", "min")

    def __init__(
        self,
        arch: str = "demo_small",
        crop_samples: int = _AUG.crop_samples,
        scale_range: tuple[float, float] = _AUG.scale_range,
        noise_std: float = _AUG.noise_std,
        wander_amp: float = _AUG.wander_amp,
        wander_hz: tuple[float, float] = _AUG.wander_hz,
        lead_mask_prob: float = _AUG.lead_mask_prob,
        proj_hidden_dim: int = 256,
        proj_dim: int = 128,
        temperature: float = 0.1,
        lr: float = 4e-3,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 10,
        cache_preprocessed: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        augment = ECGAugmentConfig(crop_samples=crop_samples, scale_range=tuple(scale_range),
                                   noise_std=noise_std, wander_amp=wander_amp, wander_hz=tuple(wander_hz),
                                   lead_mask_prob=lead_mask_prob)
        self.model = ECGContrastive(arch, augment, proj_hidden_dim, proj_dim, temperature)
        # split -> stored row -> preprocessed [12, T] float32 (cache_preprocessed)
        self.preprocessed: dict[str, dict[int, torch.Tensor]] | None = {} if cache_preprocessed else None

    def pacx_metadata(self) -> dict:
        return self.model.config_dict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed ECGs [B, 12, T] -> teacher features [B, D]."""
        return self.model(x)

    def preprocess(self, raw: torch.Tensor) -> torch.Tensor:
        """Stored rows [B, 1, 5000, 12] -> the teacher's input [B, 12, 5000] float32 on the module's
        device."""
        return _filtered(raw).to(self.device)

    def cached_preprocess(self, raw: torch.Tensor, rows: torch.Tensor, split: str) -> torch.Tensor:
        """:meth:`preprocess` of a batch of ``split``'s stored ``rows``, each row computed once
        (``cache_preprocessed``; the preprocessing treats every record on its own, so batching does not
        change it)."""
        if self.preprocessed is None:
            return self.preprocess(raw)
        store = self.preprocessed.setdefault(split, {})
        keys = rows.tolist()
        missing = [k for k, row in enumerate(keys) if row not in store]
        if missing:
            store.update({keys[k]: x for k, x in zip(missing, _filtered(raw[missing]))})
        return torch.stack([store[row] for row in keys]).to(self.device)

    def _shared_step(self, batch, stage: str, batch_idx: int) -> torch.Tensor:
        x = self.cached_preprocess(batch[0], batch[1], stage)  # batch: (raw ecg [B, 1, 5000, 12], row [B])
        gen = None if stage == "train" else torch.Generator().manual_seed(batch_idx)
        terms = self.model.forward_loss(x, gen)
        self.log_stage(stage, terms, x.shape[0], prog_bar=("loss", "view_top1"))
        return terms["loss"]

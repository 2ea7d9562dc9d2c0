"""Teacher features on the fly for Stage 2 (docs/method.md#stage-2): raw ECG/labs in, frozen-teacher embeddings out.

Stage 2 normally reads precomputed ``ecg_features.npy`` / ``labs_features.npy`` (item kind
``cxr_teachers``; ``pacx.teachers.extract_teacher_features`` writes them). Instead, a config can name
the raw release arrays and the teacher weights:

- item kind ``cxr_raw_teachers`` (registered here in ``pacx.data.symile.ITEMS``) serves
  (cxr [3, H, W] after the transform, raw ecg float32 [1, 5000, 12] as stored,
  labs percentiles float32 [50], missingness float32 [50]);
- :class:`OnTheFlyTeachers` turns a batch of those into (ecg_features [B, D_ecg], labs_features [B, D_labs])
  with the same code path as the extraction (``ECGTeacher``: NaN/inf check, ``preprocess_ecg``,
  ECGFounder's time-averaged last stage; ``LabsTeacher``: the DAE encoder on the raw percentiles with
  the mean-imputed placeholders *not* zeroed), so the numbers equal the precomputed files.
  :meth:`OnTheFlyTeachers.encode_batch` maps a ``cxr_raw_teachers`` batch to the ``cxr_teachers`` layout.

The teachers are frozen: eval mode always (``train()`` keeps them in eval), no parameter requires grad,
no autograd graph, autocast off (features in float32 whatever the trainer's precision). ECG preprocessing
is numpy on the CPU; the networks run on the device of the ECG tensor (the module moves itself there), and
the features come back on that device. Meant to run on a device batch, e.g. from a DataModule's
``on_after_batch_transfer``; it holds no Lightning code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pacx.data.symile import ITEMS, ItemKind, SymileDataset
from pacx.models.ecgfounder import preprocess_ecg
from pacx.teachers import ECGTeacher, LabsTeacher, load_teachers

log = logging.getLogger(__name__)

RAW_TEACHERS_ITEM = "cxr_raw_teachers"


# ------------------------------------------------------------------------------------------ item kind


def _cxr_raw_teachers(ds: SymileDataset, i: int) -> tuple:
    """Composed from the registered ``cxr``, ``ecg`` and ``labs`` kinds so each row is read one way only."""
    cxr, _ = ITEMS["cxr"].build(ds, i)  # [3, H, W] after the transform
    ecg, _ = ITEMS["ecg"].build(ds, i)  # [1, 5000, 12] as stored
    percentiles, missingness = ITEMS["labs"].build(ds, i)  # [50], [50] float32
    return cxr, ecg, percentiles, missingness


def register_item(name: str, kind: ItemKind) -> None:
    """Add an item kind to ``pacx.data.symile.ITEMS``; a name is registered once."""
    if name in ITEMS:
        raise KeyError(f"Symile-MIMIC item kind {name!r} registered twice")
    ITEMS[name] = kind


register_item(
    RAW_TEACHERS_ITEM,
    ItemKind("(cxr [3, H, W], raw ecg [1, 5000, 12], labs percentiles [50], missingness [50]): Stage 2 with "
             "teachers run on the fly (OnTheFlyTeachers)", _cxr_raw_teachers),
)


# ------------------------------------------------------------------------------------------ teachers


class OnTheFlyTeachers(nn.Module):
    """Frozen ECGFounder + labs DAE: ``forward(ecg_raw, percentiles, missingness) -> (ecg [B, D], labs [B, D])``.

    Args:
        ecgfounder: ECGFounder weights (any file ``load_ecgfounder`` accepts), loaded strictly.
        labs_dae: labs DAE weights (any file ``load_labs_dae`` accepts), loaded strictly.
        ecgfounder_config: named ECGFounder configuration (``12_lead`` is the release).
        trust_pickle: allow the official ``.pth`` pickle that ``weights_only`` loading refuses (logged).

    ``ecg_dim`` / ``labs_dim`` are the feature widths (1024 / 256 for the release teachers).
    """

    def __init__(
        self,
        ecgfounder: str | Path,
        labs_dae: str | Path,
        ecgfounder_config: str = "12_lead",
        trust_pickle: bool = False,
    ) -> None:
        super().__init__()
        teachers = load_teachers(ecgfounder, labs_dae, ecgfounder_config=ecgfounder_config, trust_pickle=trust_pickle)
        ecg = next(t for t in teachers if isinstance(t, ECGTeacher))
        labs = next(t for t in teachers if isinstance(t, LabsTeacher))
        # The networks are submodules (so .to() and state_dict see them); the Teacher objects hold the
        # call conventions (ECGFounder's pooled features; DAE encode without zeroing placeholders).
        self.ecg, self.labs = ecg.model, labs.model
        self._ecg_teacher, self._labs_teacher = ecg, labs
        self.ecg_dim, self.labs_dim = ecg.embed_dim, labs.embed_dim
        self.requires_grad_(False)
        self.train(False)
        log.info("on-the-fly teachers: ECGFounder %s (%s, %d-d), labs DAE %s (%d-d)", ecgfounder,
                 ecgfounder_config, self.ecg_dim, labs_dae, self.labs_dim)

    def train(self, mode: bool = True) -> OnTheFlyTeachers:
        """Always eval mode: the teachers are frozen, also inside a module that is put in training mode."""
        return super().train(False)

    def _move_to(self, device: torch.device) -> None:
        if next(self.parameters()).device != device:
            self.to(device)

    @staticmethod
    def preprocess(ecg_raw: torch.Tensor) -> torch.Tensor:
        """Raw Symile ECGs [B, 1, 5000, 12] -> ECGFounder input [B, 12, 5000] float32 on the CPU."""
        raw = ecg_raw.detach().to("cpu", torch.float32).numpy()
        bad = ~np.isfinite(raw).reshape(len(raw), -1).all(axis=1)
        if bad.any():  # preprocess_ecg would silently zero these (as ECGTeacher, refuse instead)
            raise ValueError(f"ECG batch row {int(np.argmax(bad))} has NaN or inf")
        return torch.from_numpy(preprocess_ecg(raw))

    def forward(
        self, ecg_raw: torch.Tensor, percentiles: torch.Tensor, missingness: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 1, 5000, 12], [B, 50], [B, 50] (1 = observed) -> float32 ([B, ecg_dim], [B, labs_dim]) on ecg's device."""
        device = ecg_raw.device
        self._move_to(device)
        x = self.preprocess(ecg_raw).to(device)  # [B, 12, 5000]
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            ecg = self._ecg_teacher.encode(x).float()  # [B, ecg_dim]
            labs = self._labs_teacher.encode(percentiles.to(device, torch.float32),
                                               missingness.to(device, torch.float32)).float()  # [B, labs_dim]
        return ecg, labs

    def encode_batch(self, batch: tuple | list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A ``cxr_raw_teachers`` batch -> the ``cxr_teachers`` layout (cxr, ecg_features, labs_features)."""
        cxr, ecg_raw, percentiles, missingness = batch
        ecg, labs = self(ecg_raw, percentiles, missingness)
        return cxr, ecg, labs

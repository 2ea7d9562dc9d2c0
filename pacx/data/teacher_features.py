"""Teacher features on the fly for Stage 2 (docs/method.md#stage-2): raw teacher inputs in, frozen-teacher embeddings out.

Stage 2 normally reads precomputed ``<teacher>_features.npy`` files (item kind ``cxr_teachers``;
``pacx.teachers.extract_teacher_features`` writes them). Instead, a config can name the raw release arrays
and the teacher weights (``data.item: cxr_raw_teachers``, ``data.teacher_weights``):

- item kind ``cxr_raw_teachers`` (``pacx.data.symile.ITEMS``) serves ``{"cxr": [3, H, W], "raw": {teacher:
  (a row of each of its input files, as stored)}}``;
- :class:`OnTheFlyTeachers` turns the ``raw`` part of a batch into ``{teacher: features [B, D]}`` with the
  same code path as the extraction (each registered teacher's ``preprocess`` then ``encode``; for the ECG
  the NaN/inf check, ``preprocess_ecg`` and ECGFounder's time-averaged last stage, for the labs the DAE
  encoder on the raw percentiles with the mean-imputed placeholders *not* zeroed), so the numbers equal
  the precomputed files. :meth:`OnTheFlyTeachers.encode_batch` maps a ``cxr_raw_teachers`` batch to the
  ``cxr_teachers`` layout ``{"cxr": ..., "teachers": {...}}``.

The teachers are frozen: eval mode always (``train()`` keeps them in eval), no parameter requires grad,
no autograd graph, autocast off (features in float32 whatever the trainer's precision). Preprocessing is
numpy on the CPU; the networks run on the device of the CXR batch (the module moves itself there), and
the features come back on that device. Meant to run on a device batch, e.g. from a DataModule's
``on_after_batch_transfer``; it holds no Lightning code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pacx.teachers import load_teachers

log = logging.getLogger(__name__)


class OnTheFlyTeachers(nn.Module):
    """Frozen teachers: ``forward({teacher: raw input tensors}) -> {teacher: features [B, D]}``.

    Args:
        weights: ``{teacher: weights file}`` for registered teachers (``pacx.teachers.TEACHERS``), each
            loaded strictly by its spec.
        options: ``{teacher: loader options}``, e.g. ``{"ecg": {"config": "demo_small"}}`` (ECGFounder's named
            configuration; ``trust_pickle`` allows the official ``.pth`` pickle, logged).

    ``dims`` holds each teacher's feature width (1024 / 256 for the release teachers).
    """

    def __init__(self, weights: Mapping[str, str | Path], options: Mapping[str, Mapping] | None = None) -> None:
        super().__init__()
        teachers = load_teachers(weights, options)
        # The networks are submodules (so .to() and state_dict see them); the Teacher objects hold the
        # call conventions (their spec's preprocess and encode).
        self.networks = nn.ModuleDict({t.spec.name: t.model for t in teachers})
        self._teachers = {t.spec.name: t for t in teachers}
        self.dims = {name: t.embed_dim for name, t in self._teachers.items()}
        self.requires_grad_(False)
        self.train(False)
        log.info("on-the-fly teachers: %s", ", ".join(f"{n} {weights[n]} ({d}-d)" for n, d in self.dims.items()))

    def train(self, mode: bool = True) -> OnTheFlyTeachers:
        """Always eval mode: the teachers are frozen, also inside a module that is put in training mode."""
        return super().train(False)

    def _move_to(self, device: torch.device) -> None:
        if next(self.parameters()).device != device:
            self.to(device)

    def preprocess(self, teacher: str, raw: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """One teacher's raw rows (any device) -> its network inputs on the CPU, by its spec's ``preprocess``."""
        arrays = [x.detach().cpu().numpy() for x in raw]
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in self._teachers[teacher].spec.preprocess(*arrays))

    def forward(self, raw: Mapping[str, tuple[torch.Tensor, ...]], device: torch.device | None = None) -> dict:
        """``{teacher: raw input tensors [B, ...]}`` -> float32 ``{teacher: [B, D]}`` on ``device`` (default:
        that of the first raw tensor), every teacher of this module."""
        missing = sorted(set(self._teachers) - set(raw))
        if missing:
            raise ValueError(f"no raw inputs for teacher(s) {missing} in the batch (it holds {sorted(raw)})")
        device = device if device is not None else next(iter(raw.values()))[0].device
        self._move_to(device)
        out = {}
        for name, teacher in self._teachers.items():
            inputs = [x.to(device) for x in self.preprocess(name, raw[name])]
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                out[name] = teacher.encode(*inputs).float()  # [B, D]
        return out

    def encode_batch(self, batch: Mapping) -> dict:
        """A ``cxr_raw_teachers`` batch -> the ``cxr_teachers`` layout ``{"cxr": ..., "teachers": {...}}``."""
        return {"cxr": batch["cxr"], "teachers": self(batch["raw"], device=batch["cxr"].device)}

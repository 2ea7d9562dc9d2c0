"""Teacher features on the fly for Stage 2 (docs/method.md#stage-2): raw teacher inputs in, embeddings out.

With ``data.item: cxr_raw_teachers`` and ``data.teacher_weights``, :class:`OnTheFlyTeachers` turns the ``raw``
part of a batch into ``{teacher: features [B, D]}`` by the extraction's own code path, so the numbers equal
the precomputed ``<teacher>_features.npy``. Meant for a DataModule's ``on_after_batch_transfer``; holds no
Lightning code. How the teachers stay frozen: docs/design.md#on-the-fly-teachers.
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


class RawRows:
    """The ``raw`` part of a collated ``cxr_raw_teachers`` batch when the teachers run on the fly: ``rows`` is
    ``{teacher: (its input rows [B, ...] as stored)}``, on the CPU.

    Deliberately not a mapping, sequence or dataclass and without ``.to``: Lightning then neither casts it
    (``precision: 16-true`` / ``bf16-true`` convert every float tensor of a batch before
    ``on_after_batch_transfer``) nor moves it, so the teachers see the rows as extraction reads them.
    """

    def __init__(self, rows: Mapping[str, tuple[torch.Tensor, ...]]) -> None:
        self.rows = rows

    def __repr__(self) -> str:
        return f"RawRows({sorted(self.rows)})"


class OnTheFlyTeachers(nn.Module):
    """Frozen teachers: ``forward({teacher: raw input tensors}) -> {teacher: features [B, D]}``.

    Args:
        weights: ``{teacher: weights file}`` for registered teachers (``pacx.teachers.TEACHERS``), each
            loaded strictly by its spec.
        options: ``{teacher: loader options}``, e.g. ``{"ecg": {"config": "demo_small"}}`` (ECGFounder's named
            configuration; ``trust_pickle`` allows the official ``.pth`` pickle, logged).

    ``dims`` holds each teacher's feature width (1024 / 256 for the release teachers).
    """

    def __init__(self, weights: Mapping[str, str | Path],
                 options: Mapping[str, Mapping] | None = None) -> None:
        super().__init__()
        teachers = load_teachers(weights, options)
        # The networks are submodules (so .to() and state_dict see them); the Teacher objects hold the
        # call conventions (their spec's preprocess and encode).
        self.networks = nn.ModuleDict({t.spec.name: t.model for t in teachers})
        self._teachers = {t.spec.name: t for t in teachers}
        self.dims = {name: t.embed_dim for name, t in self._teachers.items()}
        self.requires_grad_(False)
        self.train(False)
        log.info("on-the-fly teachers: %s",
                 ", ".join(f"{n} {weights[n]} ({d}-d)" for n, d in self.dims.items()))

    def train(self, mode: bool = True) -> OnTheFlyTeachers:
        """Always eval mode: the teachers are frozen, also inside a module that is put in training mode."""
        return super().train(False)

    def _move_to(self, device: torch.device) -> None:
        if next(self.parameters()).device != device:
            self.to(device)

    def preprocess(self, teacher: str, raw: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """One teacher's raw rows (any device) -> its network inputs on the CPU, by its spec's
        ``preprocess``."""
        arrays = [x.detach().cpu().numpy() for x in raw]
        inputs = self._teachers[teacher].spec.preprocess(*arrays)
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs)

    def forward(self, raw: Mapping[str, tuple[torch.Tensor, ...]],
                device: torch.device | None = None) -> dict:
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
        """A ``cxr_raw_teachers`` batch (``raw`` a mapping or :class:`RawRows`) -> the ``cxr_teachers`` layout
        ``{"cxr": ..., "teachers": {...}}``."""
        raw = batch["raw"]
        rows = raw.rows if isinstance(raw, RawRows) else raw
        return {"cxr": batch["cxr"], "teachers": self(rows, device=batch["cxr"].device)}

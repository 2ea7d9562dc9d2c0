"""Symile-MIMIC data for the teachers and Stage 2 (docs/datasets.md#symile): memory-mapped named item kinds.

The release files are opened with ``np.load(mmap_mode="r")`` and served as one of the item kinds of ``ITEMS``
(``labs``, ``labs_raw``, ``ecg``, ``cxr``, ``cxr_teachers``, ``cxr_raw_teachers``), chosen by ``item``. CXR
transforms are registered by name in ``CXR_TRANSFORMS`` (``resize``; ``robust_train``, from
:mod:`pacx.data.augment`); unknown names are an error. Item layouts: docs/design.md#symile-items.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms.v2 import functional as TF

from pacx.data.augment import RobustTrainTransforms
from pacx.data.common import eval_loader, per_device_batch_size
from pacx.data.resumable import train_loader
from pacx.data.symile_files import FILES, FileSpec, ValidationCache, validate_split
from pacx.data.teacher_features import OnTheFlyTeachers, RawRows
from pacx.teachers import DEFAULT_TEACHERS, TeacherSpec, resolve_teachers, teacher_spec

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ CXR transforms


def resize_normalized(img_size: int = 224) -> Callable[[torch.Tensor], torch.Tensor]:
    """docs/datasets.md#stage-2-data val/test: ``Resize((img_size, img_size), antialias=True)`` on the
    normalised tensor, no more."""
    return functools.partial(TF.resize, size=[img_size, img_size], antialias=True)  # picklable for workers


# name -> builder(img_size) -> callable on a normalised float32 [3, H, W] tensor
CXR_TRANSFORMS: dict[str, Callable[[int], Callable[[torch.Tensor], torch.Tensor]]] = {
    "resize": resize_normalized,
    "robust_train": RobustTrainTransforms,
}


def register_cxr_transform(name: str):
    """Register a CXR transform builder ``fn(img_size) -> transform`` under ``name``."""

    def deco(fn):
        if name in CXR_TRANSFORMS:
            raise KeyError(f"CXR transform {name!r} registered twice")
        CXR_TRANSFORMS[name] = fn
        return fn

    return deco


def build_cxr_transform(name: str, img_size: int, **kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in CXR_TRANSFORMS:
        raise KeyError(f"unknown CXR transform {name!r}; registered: {sorted(CXR_TRANSFORMS)}")
    return CXR_TRANSFORMS[name](img_size, **kwargs)


# ------------------------------------------------------------------------------------------ item kinds


def _row_f32(arr: np.ndarray, i: int) -> torch.Tensor:
    """Row ``i`` copied out of the read-only memory map as float32 (missingness is int64 on disk)."""
    return torch.from_numpy(np.array(arr[i], dtype=np.float32))


@dataclass(frozen=True)
class ItemKind:
    """What one dataset item is: ``build(dataset, i)`` reads the arrays of the files that need this kind.

    ``teacher_files`` (Stage 2 kinds): the files the kind reads for one teacher, beyond the file table's.
    """

    description: str
    build: Callable[[SymileDataset, int], tuple | dict]
    teacher_files: Callable[[TeacherSpec], tuple[FileSpec, ...]] | None = None


def _cxr(ds: SymileDataset, i: int) -> torch.Tensor:
    x = _row_f32(ds.arrays["cxr"], i)  # [3, H, W]
    return ds.transform(x) if ds.transform is not None else x


def _labs(ds: SymileDataset, i: int) -> tuple:
    return _row_f32(ds.arrays["labs_percentiles"], i), _row_f32(ds.arrays["labs_missingness"], i)


def _labs_raw(ds: SymileDataset, i: int) -> tuple:
    return *_labs(ds, i), i


def _ecg(ds: SymileDataset, i: int) -> tuple:
    return _row_f32(ds.arrays["ecg"], i), i  # [1, 5000, 12] as stored


def _cxr_index(ds: SymileDataset, i: int) -> tuple:
    return _cxr(ds, i), i


def _cxr_teachers(ds: SymileDataset, i: int) -> dict:
    return {"cxr": _cxr(ds, i),
            "teachers": {name: _row_f32(ds.arrays[keys[0]], i) for name, keys in ds.teacher_files.items()}}


def _cxr_raw_teachers(ds: SymileDataset, i: int) -> dict:
    raw = {name: tuple(torch.from_numpy(np.array(ds.arrays[k][i])) for k in keys)  # rows as stored
           for name, keys in ds.teacher_files.items()}
    return {"cxr": _cxr(ds, i), "raw": raw}


def collate_raw_teachers(items: list[dict]) -> dict:
    """``cxr_raw_teachers`` items -> a batch whose ``raw`` part is :class:`RawRows`, which Lightning neither
    casts to the trainer's precision nor moves: the loader's collate when the teachers run on the fly."""
    return {"cxr": default_collate([item["cxr"] for item in items]),
            "raw": RawRows(default_collate([item["raw"] for item in items]))}


RAW_TEACHERS_ITEM = "cxr_raw_teachers"
ITEMS: dict[str, ItemKind] = {
    "labs": ItemKind("(percentiles [50], missingness [50]) float32: Labs DAE training", _labs),
    "labs_raw": ItemKind("(percentiles [50], missingness [50], index): Labs DAE extraction", _labs_raw),
    "ecg": ItemKind("(ecg float32 [1, 5000, 12] as stored, index): ECGFounder feature extraction", _ecg),
    "cxr": ItemKind("(cxr float32 [3, H, W] after the transform, index)", _cxr_index),
    "cxr_teachers": ItemKind("{cxr [3, H, W], teachers: {name: features [D]}}: Stage 2 distillation",
                             _cxr_teachers, lambda spec: (spec.feature_spec,)),
    "cxr_raw_teachers": ItemKind("{cxr [3, H, W], raw: {name: its input rows}}: Stage 2 with teachers run on "
                                 "the fly (OnTheFlyTeachers)", _cxr_raw_teachers, lambda spec: spec.inputs),
}


def item_kind(name: str) -> ItemKind:
    if name not in ITEMS:
        raise KeyError(f"unknown Symile-MIMIC item kind {name!r}; known: {sorted(ITEMS)}")
    return ITEMS[name]


def uses_cxr(item: str) -> bool:
    """Whether ``item`` reads CXR images (and so needs a transform); from the file table."""
    return any(spec.key == "cxr" and spec.items is not None and item in spec.items for spec in FILES)


# ------------------------------------------------------------------------------------------ dataset


class SymileDataset(Dataset):
    """One split of ``<root>`` served as item kind ``item``; the files are validated on construction.

    The memory maps open lazily in each process and are dropped when pickled, so DataLoader workers
    (fork, spawn or forkserver) each map the files themselves instead of receiving copies.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        item: str,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        check_values: bool = True,
        cache: ValidationCache | None = None,
        teachers: Sequence[str] = DEFAULT_TEACHERS,
    ) -> None:
        kind = item_kind(item)
        self.item, self.split, self.transform = item, split, transform
        specs = [teacher_spec(t) for t in teachers] if kind.teacher_files else []
        # teacher -> the file keys the item reads for it (plain strings: the dataset pickles to workers)
        self.teacher_files = {s.name: tuple(f.key for f in kind.teacher_files(s)) for s in specs}
        extra = [f for s in specs for f in kind.teacher_files(s)]
        self.paths = validate_split(root, split, item, check_values=check_values, cache=cache, extra=extra)
        self._arrays: dict[str, np.ndarray] | None = None
        self._len = len(self.arrays["hadm_id"])

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {key: np.load(path, mmap_mode="r") for key, path in self.paths.items()}
        return self._arrays

    @property
    def hadm_ids(self) -> np.ndarray:
        """[N] admission ids in row order (for test_uni: the query ``label_hadm_id``s)."""
        return np.asarray(self.arrays["hadm_id"])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple | dict:
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self.split} ({self._len} rows)")
        return ITEMS[self.item].build(self, index)


# ------------------------------------------------------------------------------------------ DataModule

# Lightning stage -> loader roles it uses (None: every configured role).
STAGE_ROLES: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
    None: ("train", "val", "test", "predict"),
}


class SymileMIMICDataModule(pl.LightningDataModule):
    """Symile-MIMIC splits for the Labs DAE, teacher-feature extraction and Stage 2
    (docs/datasets.md#stage-2-data).

    Args:
        root: the ``data_npy`` directory (holding ``train/``, ``val/``, ...).
        item: the item kind served by every loader (``ITEMS``).
        batch_size: the **global** batch; the per-device batch is ``batch_size // world_size``.
        train_split / val_split / test_split / predict_split: split names for each loader
            (``None`` = no such loader). Train is shuffled with ``drop_last``; the others are neither.
        img_size: CXR side after the transform.
        train_transform: CXR transform name (``CXR_TRANSFORMS``) for the train loader; required when
            ``item`` reads CXRs and a train split is used.
        eval_transform: CXR transform name for the other loaders (docs/datasets.md#stage-2-data: ``resize``).
        check_values: scan values (NaN/inf, 0/1 flags, [0, 1] percentiles) on setup, not only layout.
        validation_cache: JSON file remembering passed scans across runs (per file size + mtime).
        serve_teachers: the teachers ``cxr_teachers`` / ``cxr_raw_teachers`` serve
            (``pacx.teachers.TEACHERS``); ``None``: the model's (``teacher_names`` of the LightningModule it
            is trained with), else ``DEFAULT_TEACHERS``. Set it only to serve a data module without its Stage
            2 model.
        teacher_weights: ``{teacher: weights file}`` of every served teacher, to encode ``cxr_raw_teachers``
            batches on the device (:class:`~pacx.data.teacher_features.OnTheFlyTeachers`) instead of reading
            precomputed feature files; ``teacher_options`` holds each one's loader options
            (e.g. ``{ecg: {config: demo_small}}``).
        ecgfounder / labs_dae / ecgfounder_config: the earlier keys, read with a ``FutureWarning`` as
            ``teacher_weights: {ecg: ..., labs: ...}`` and ``teacher_options: {ecg: {config: ...}}``.
    """

    def __init__(
        self,
        root: str,
        item: str,
        batch_size: int = 128,
        num_workers: int = 8,
        train_split: str | None = "train",
        val_split: str | None = "val",
        test_split: str | None = None,
        predict_split: str | None = None,
        img_size: int = 224,
        train_transform: str | None = None,
        eval_transform: str = "resize",
        pin_memory: bool = True,
        check_values: bool = True,
        validation_cache: str | None = None,
        train_transform_args: dict | None = None,
        serve_teachers: list[str] | None = None,
        teacher_weights: dict[str, str] | None = None,
        teacher_options: dict[str, dict] | None = None,
        ecgfounder: str | None = None,
        labs_dae: str | None = None,
        ecgfounder_config: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        item_kind(item)  # fail at construction on a typo
        legacy = {"ecg": ecgfounder, "labs": labs_dae}
        # ecgfounder_config matters only with weights: alone (its old default, 12_lead) it configured nothing
        if any(legacy.values()) or (ecgfounder_config and teacher_weights):
            warnings.warn("data.ecgfounder / labs_dae / ecgfounder_config are deprecated: read as "
                          "teacher_weights "
                          "and teacher_options (docs/method.md#stage-2)", FutureWarning, stacklevel=2)
            teacher_weights = {**{t: w for t, w in legacy.items() if w}, **(teacher_weights or {})}
            if ecgfounder_config:
                given = (teacher_options or {}).get("ecg", {}).get("config", ecgfounder_config)
                if given != ecgfounder_config:
                    raise ValueError(f"data.ecgfounder_config {ecgfounder_config!r} and teacher_options"
                                     f".ecg.config {given!r} disagree: set teacher_options only")
                ecg = {"config": ecgfounder_config, **(teacher_options or {}).get("ecg", {})}
                teacher_options = {**(teacher_options or {}), "ecg": ecg}
            self.hparams.update(teacher_weights=teacher_weights, teacher_options=teacher_options)
        if teacher_weights and item != RAW_TEACHERS_ITEM:
            raise ValueError(f"teacher_weights (teachers run on the fly) go with item {RAW_TEACHERS_ITEM!r}, "
                             f"got item {item!r}")
        if serve_teachers is not None:
            resolve_teachers(serve_teachers)  # fail at construction on a typo
        self.per_device_batch = batch_size
        self.datasets: dict[str, SymileDataset] = {}
        self.teacher_names: tuple[str, ...] = ()  # set by setup
        self.teachers = None  # OnTheFlyTeachers, with teacher_weights

    def _transform(self, role: str) -> Callable | None:
        h = self.hparams
        if not uses_cxr(h.item):
            return None
        name = h.train_transform if role == "train" else h.eval_transform
        if name is None:
            raise ValueError(
                f"item {h.item!r} serves CXR images on the train split but train_transform is not set; "
                f"registered: {sorted(CXR_TRANSFORMS)}"
            )
        kwargs = (h.train_transform_args or {}) if role == "train" else {}
        return build_cxr_transform(name, h.img_size, **kwargs)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        self.per_device_batch = per_device_batch_size(h.batch_size, self.trainer)
        if not Path(h.root).is_dir():
            raise FileNotFoundError(f"Symile-MIMIC root is not a directory: {h.root}")
        cache = ValidationCache(h.validation_cache)
        self.teacher_names = self._resolve_teacher_names()
        if h.item == RAW_TEACHERS_ITEM and not h.teacher_weights and self._model_teacher_names() is not None:
            raise ValueError(f"item {RAW_TEACHERS_ITEM!r} serves raw teacher inputs, but the model distils "
                             "from teacher features: set data.teacher_weights {teacher: weights file} for "
                             f"{list(self.teacher_names)} to run them on the fly, or use item 'cxr_teachers' "
                             "(docs/design.md#on-the-fly-teachers)")
        if h.teacher_weights and self.teachers is None:
            missing = sorted(set(self.teacher_names) - set(h.teacher_weights))
            extra = sorted(set(h.teacher_weights) - set(self.teacher_names))
            if missing or extra:
                raise ValueError("teacher_weights must name exactly the teachers served, "
                                 f"{list(self.teacher_names)}: missing {missing}, not distilled from {extra}")
            weights = {t: h.teacher_weights[t] for t in self.teacher_names}
            self.teachers = OnTheFlyTeachers(weights, h.teacher_options)
        for role in STAGE_ROLES[stage]:
            split = h[f"{role}_split"]
            if split is None or role in self.datasets:
                continue
            self.datasets[role] = SymileDataset(
                h.root, split, h.item, self._transform(role), check_values=h.check_values, cache=cache,
                teachers=self.teacher_names,
            )
            log.info("Symile-MIMIC %s loader: split %s, %d items of kind %r, per-device batch %d",
                     role, split, len(self.datasets[role]), h.item, self.per_device_batch)
        self.feature_widths()  # the loaders agree on the teacher feature widths

    def _model_teacher_names(self) -> tuple[str, ...] | None:
        """``teacher_names`` of the LightningModule this data module is trained with, if any."""
        trainer = getattr(self, "trainer", None)
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        return getattr(model, "teacher_names", None)

    def _resolve_teacher_names(self) -> tuple[str, ...]:
        """``serve_teachers``, else the model's, else the defaults; an explicit list must match the
        model's."""
        from_model = self._model_teacher_names()
        given = self.hparams.serve_teachers
        if given is not None and from_model is not None and tuple(given) != tuple(from_model):
            raise ValueError(f"data.serve_teachers {list(given)} differs from the model's teachers "
                             f"{list(from_model)}: leave it unset (it follows the model)")
        return resolve_teachers(given if given is not None else from_model)

    def feature_widths(self) -> dict[str, tuple[int, Path]]:
        """``{teacher: (width, path)}`` of the teacher feature files the set-up loaders read (loaders that
        disagree are an error naming both files), or of the weights of the teachers run on the fly."""
        widths: dict[str, tuple[int, Path]] = {}
        if self.teachers is not None:
            return {t: (int(d), Path(self.hparams.teacher_weights[t])) for t, d in self.teachers.dims.items()}
        for ds in self.datasets.values():
            if ds.item != "cxr_teachers":
                continue
            for teacher, (key,) in ds.teacher_files.items():
                width = int(ds.arrays[key].shape[1])
                if teacher in widths and widths[teacher][0] != width:
                    raise ValueError(f"{ds.paths[key]} holds {width}-wide features but "
                                     f"{widths[teacher][1]} holds {widths[teacher][0]}-wide ones: all splits "
                                     "need the same teacher")
                widths.setdefault(teacher, (width, ds.paths[key]))
        return widths

    def teacher_features(self, role: str = "train") -> dict[str, np.ndarray]:
        """``{teacher: features [N, D]}`` (float64, read whole) of one set-up loader's teacher feature files,
        for Stage 2's ``teacher_norm``; an error when that split has none (on-the-fly teachers)."""
        ds = self.datasets.get(role)
        if ds is None:
            raise RuntimeError(f"teacher_features needs the {role} split (setup() first)")
        if ds.item != "cxr_teachers":
            raise ValueError(f"{self.hparams.root}/{ds.split}: item {ds.item!r} reads no teacher feature "
                             "files; teacher_norm needs precomputed teacher features (item cxr_teachers); "
                             "with on-the-fly teachers use teacher_norm: raw")
        return {teacher: np.asarray(ds.arrays[key], dtype=np.float64)
                for teacher, (key,) in ds.teacher_files.items()}

    def _loader(self, role: str) -> DataLoader | list:
        h = self.hparams
        if h[f"{role}_split"] is None and role != "train":
            return []  # Lightning runs no loop for an empty loader list
        if role not in self.datasets:
            raise RuntimeError(f"no {role} loader: {role}_split is not set or setup() has not run for it")
        kwargs = dict(num_workers=h.num_workers, pin_memory=h.pin_memory,
                      persistent_workers=h.num_workers > 0)
        if self.teachers is not None:  # raw rows as stored, whatever the trainer's precision
            kwargs["collate_fn"] = collate_raw_teachers
        if role == "train":  # exactly resumable order (pacx.data.resumable)
            return train_loader(self.datasets[role], self.per_device_batch, self.trainer, **kwargs)
        if not getattr(getattr(self.trainer, "lightning_module", None), "eval_step_collectives", True):
            # each row once under DDP
            return eval_loader(self.datasets[role], self.per_device_batch, self.trainer, **kwargs)
        # evaluation steps that gather across ranks (Stage 2's InfoNCE, the ECG teacher's views) need as many
        # steps on every rank: Lightning's DistributedSampler, which repeats up to W - 1 rows (Stage 2 cuts
        # them from its whole-split readings)
        return DataLoader(self.datasets[role], batch_size=self.per_device_batch, shuffle=False, **kwargs)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """``cxr_raw_teachers`` batches become teacher features here, on the device, with the frozen
        teachers."""
        return self.teachers.encode_batch(batch) if self.teachers is not None else batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("predict")

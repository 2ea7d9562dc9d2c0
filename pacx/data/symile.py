"""Symile-MIMIC data for the teachers and Stage 2 (docs/datasets.md#symile): memory-mapped splits as named item kinds.

The release files (``pacx.data.symile_files.FILES``) are opened with ``np.load(mmap_mode="r")`` and
served as one of the item kinds of ``ITEMS``, chosen by the ``item`` config argument:

- ``labs``: (percentiles float32 [50], missingness float32 [50]) for the Labs DAE;
- ``labs_raw``: the same plus the row index, for feature extraction in file order;
- ``ecg``: (raw ecg float32 [1, 5000, 12] as stored, index), for ECGFounder feature extraction;
- ``cxr``: (cxr float32 [3, H, W] after the transform, index);
- ``cxr_teachers``: (cxr [3, H, W], ecg_features [1024], labs_features [256]) for Stage 2 (docs/datasets.md#stage-2-data);
- ``cxr_raw_teachers`` (``pacx.data.teacher_features``): (cxr, raw ecg, percentiles, missingness); with
  ``ecgfounder`` / ``labs_dae`` weights the data module encodes them on the device with the frozen
  teachers (``on_after_batch_transfer``), so Stage 2 receives the ``cxr_teachers`` layout without
  precomputed feature files.

CXR arrays are already ImageNet-normalised, so CXR transforms take and return normalised tensors.
``CXR_TRANSFORMS`` holds them by name; ``train_transform`` / ``eval_transform`` name one. Registered
here: ``resize`` (docs/datasets.md#stage-2-data val/test: square resize with antialias, nothing else); ``pacx.data.augment``
registers ``robust_train`` (the docs/datasets.md#stage-2-data Stage 2 train augmentation, settings via ``train_transform_args``).
Unknown names are an error, never a silent fallback.
Every split a stage uses is validated on setup (``pacx.data.symile_files.validate_split``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from pacx.data.common import per_device_batch_size
from pacx.data.resumable import train_loader
from pacx.data.symile_files import FILES, ValidationCache, validate_split

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ CXR transforms

# name -> builder(img_size) -> callable on a normalised float32 [3, H, W] tensor
CXR_TRANSFORMS: dict[str, Callable[[int], Callable[[torch.Tensor], torch.Tensor]]] = {}


def register_cxr_transform(name: str):
    """Register a CXR transform builder ``fn(img_size) -> transform`` under ``name``."""

    def deco(fn):
        if name in CXR_TRANSFORMS:
            raise KeyError(f"CXR transform {name!r} registered twice")
        CXR_TRANSFORMS[name] = fn
        return fn

    return deco


@register_cxr_transform("resize")
def resize_normalized(img_size: int = 224) -> Callable[[torch.Tensor], torch.Tensor]:
    """docs/datasets.md#stage-2-data val/test: ``Resize((img_size, img_size), antialias=True)`` on the normalised tensor, no more."""
    return functools.partial(TF.resize, size=[img_size, img_size], antialias=True)  # picklable for workers


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
    """What one dataset item is: ``build(dataset, i)`` reads the arrays of the files that need this kind."""

    description: str
    build: Callable[[SymileDataset, int], tuple]


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


def _cxr_teachers(ds: SymileDataset, i: int) -> tuple:
    return _cxr(ds, i), _row_f32(ds.arrays["ecg_features"], i), _row_f32(ds.arrays["labs_features"], i)


ITEMS: dict[str, ItemKind] = {
    "labs": ItemKind("(percentiles [50], missingness [50]) float32: Labs DAE training", _labs),
    "labs_raw": ItemKind("(percentiles [50], missingness [50], index): Labs DAE extraction", _labs_raw),
    "ecg": ItemKind("(ecg float32 [1, 5000, 12] as stored, index): ECGFounder feature extraction", _ecg),
    "cxr": ItemKind("(cxr float32 [3, H, W] after the transform, index)", _cxr_index),
    "cxr_teachers": ItemKind(
        "(cxr [3, H, W], ecg_features [1024], labs_features [256]): Stage 2 distillation", _cxr_teachers
    ),
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
    ) -> None:
        item_kind(item)
        self.item, self.split, self.transform = item, split, transform
        self.paths = validate_split(root, split, item, check_values=check_values, cache=cache)
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

    def __getitem__(self, index: int) -> tuple:
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
    """Symile-MIMIC splits for the Labs DAE, teacher-feature extraction and Stage 2 (docs/datasets.md#stage-2-data).

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
        ecgfounder: str | None = None,
        labs_dae: str | None = None,
        ecgfounder_config: str = "12_lead",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        item_kind(item)  # fail at construction on a typo
        if bool(ecgfounder) != bool(labs_dae) or (ecgfounder and item != "cxr_raw_teachers"):
            raise ValueError("on-the-fly teachers need both ecgfounder and labs_dae, with item "
                             f"'cxr_raw_teachers' (got item {item!r}, ecgfounder={ecgfounder}, labs_dae={labs_dae})")
        self.per_device_batch = batch_size
        self.datasets: dict[str, SymileDataset] = {}
        self.teachers = None

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
        if h.ecgfounder and self.teachers is None:
            from pacx.data.teacher_features import OnTheFlyTeachers

            self.teachers = OnTheFlyTeachers(h.ecgfounder, h.labs_dae, h.ecgfounder_config)
        for role in STAGE_ROLES[stage]:
            split = h[f"{role}_split"]
            if split is None or role in self.datasets:
                continue
            self.datasets[role] = SymileDataset(
                h.root, split, h.item, self._transform(role), check_values=h.check_values, cache=cache
            )
            log.info("Symile-MIMIC %s loader: split %s, %d items of kind %r, per-device batch %d",
                     role, split, len(self.datasets[role]), h.item, self.per_device_batch)
        self.feature_widths()  # the loaders agree on the teacher feature widths

    def feature_widths(self) -> dict[str, tuple[int, Path]]:
        """``{file key: (width, path)}`` of the teacher feature files the set-up loaders read
        (``ecg_features`` / ``labs_features``); loaders that disagree are an error naming both files."""
        widths: dict[str, tuple[int, Path]] = {}
        for ds in self.datasets.values():
            for key in ("ecg_features", "labs_features"):
                if key not in ds.paths:
                    continue
                width = int(ds.arrays[key].shape[1])
                if key in widths and widths[key][0] != width:
                    raise ValueError(f"{ds.paths[key]} holds {width}-wide features but {widths[key][1]} holds "
                                     f"{widths[key][0]}-wide ones: all splits need the same teacher")
                widths.setdefault(key, (width, ds.paths[key]))
        return widths

    def teacher_features(self, role: str = "train") -> dict[str, np.ndarray]:
        """``{teacher: features [N, D]}`` (float64, read whole) of one set-up loader's teacher feature files,
        for Stage 2's ``teacher_norm``; an error when that split has none (on-the-fly teachers)."""
        ds = self.datasets.get(role)
        if ds is None:
            raise RuntimeError(f"teacher_features needs the {role} split (setup() first)")
        out = {}
        for teacher in ("ecg", "labs"):
            key = f"{teacher}_features"
            if key not in ds.paths:
                raise ValueError(f"{self.hparams.root}/{ds.split}: no {key}.npy; teacher_norm needs precomputed "
                                 "teacher features (item cxr_teachers); with on-the-fly teachers use teacher_norm: raw")
            out[teacher] = np.asarray(ds.arrays[key], dtype=np.float64)
        return out

    def _loader(self, role: str) -> DataLoader | list:
        h = self.hparams
        if h[f"{role}_split"] is None and role != "train":
            return []  # Lightning runs no loop for an empty loader list
        if role not in self.datasets:
            raise RuntimeError(f"no {role} loader: {role}_split is not set or setup() has not run for it")
        kwargs = dict(num_workers=h.num_workers, pin_memory=h.pin_memory, persistent_workers=h.num_workers > 0)
        if role == "train":  # exactly resumable order (pacx.data.resumable)
            return train_loader(self.datasets[role], self.per_device_batch, self.trainer, **kwargs)
        return DataLoader(self.datasets[role], batch_size=self.per_device_batch, shuffle=False, **kwargs)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Raw ECG/labs batches become teacher features here, on the device, with the frozen teachers."""
        return self.teachers.encode_batch(batch) if self.teachers is not None else batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("predict")

from pacx.data import augment, teacher_features  # noqa: E402, F401  (they register "robust_train", "cxr_raw_teachers")

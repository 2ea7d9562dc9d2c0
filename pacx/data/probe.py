"""Labelled image sets for the online linear probe (:class:`pacx.lit.health.OnlineLinearProbe`).

A :class:`ProbeData` loads ``(images float32 [N, 3, S, S], labels int64 [N] in {0, 1})`` once, from a CSV
manifest (:class:`ManifestProbeData`, Stage 1) or a Symile-layout ``cxr_<split>.npy`` with a label CSV
(:class:`ArrayProbeData`, Stage 2). Rows whose label is not 0 or 1 are dropped and counted; at most
``max_samples`` rows are drawn with ``np.random.default_rng(seed)`` (docs/design.md#online-probe).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pacx.data.manifest import ImageManifestDataset, ManifestError, read_manifest
from pacx.data.symile import resize_normalized
from pacx.data.symile_files import SymileFileError, open_npy
from pacx.data.transforms import resize_eval

log = logging.getLogger(__name__)

RESIZE_CHUNK = 64  # rows of a memory-mapped array read and resized at a time


class ProbeData:
    """A labelled image set; subclasses implement :meth:`load`."""

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images float32 [N, 3, S, S], labels int64 [N] in {0, 1})``."""
        raise NotImplementedError


def binary_rows(values: pd.Series, source: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the rows labelled 0 or 1, their labels as int64); other rows are dropped and counted."""
    numeric = pd.to_numeric(values, errors="coerce")
    keep = numeric.isin([0, 1]).to_numpy()
    dropped = int((~keep).sum())
    if dropped:
        log.info("%s: column %r: dropped %d of %d rows whose label is not 0/1 (blank, uncertain or other)",
                 source, column, dropped, len(keep))
    return np.flatnonzero(keep), numeric.to_numpy()[keep].astype(np.int64)


def seeded_subset(n: int, max_samples: int, seed: int) -> np.ndarray:
    """Sorted positions: all ``n`` rows, or ``max_samples`` of them drawn without replacement."""
    if n <= max_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


def check_classes(labels: np.ndarray, source: str, column: str) -> None:
    counts = np.bincount(labels, minlength=2)
    if counts.min() < 2:
        raise ValueError(f"{source}: column {column!r} leaves {counts[0]} negative and {counts[1]} positive "
                         "rows for the probe; it needs at least 2 of each (raise max_samples or pick "
                         "another label)")


class ManifestProbeData(ProbeData):
    """Images named by a CSV manifest with a binary label column.

    Args:
        manifest: the CSV (e.g. CheXpert's ``valid.csv``, or a ``scripts/prepare.py`` manifest).
        image_root: the directory the ``path_column`` values are relative to (for the release CSVs:
            the parent of ``CheXpert-v1.0-small``).
        label: the label column (e.g. ``Cardiomegaly``); rows not labelled 0/1 are dropped.
        path_column: the image path column.
        img_size: side of the square evaluation resize.
        max_samples / seed: at most this many rows, drawn with ``default_rng(seed)``.
    """

    def __init__(self, manifest: str, image_root: str, label: str, path_column: str = "Path",
                 img_size: int = 224, max_samples: int = 1000, seed: int = 0) -> None:
        self.manifest, self.image_root, self.label = manifest, image_root, label
        self.path_column, self.img_size = path_column, img_size
        self.max_samples, self.seed = max_samples, seed

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        df = read_manifest(self.manifest, [self.path_column, self.label])
        rows, labels = binary_rows(df[self.label], self.manifest, self.label)
        take = seeded_subset(len(rows), self.max_samples, self.seed)
        labels = labels[take]
        check_classes(labels, self.manifest, self.label)
        ds = ImageManifestDataset(df.iloc[rows[take]], self.image_root, self.path_column,
                                  transform=resize_eval(self.img_size), source=self.manifest)
        images = torch.stack([ds[i][0] for i in range(len(ds))])  # [N, 3, S, S]
        log.info("probe data %s: %d images, %d positive for %r", self.manifest, len(labels), labels.sum(),
                 self.label)
        return images, torch.from_numpy(labels)


class ArrayProbeData(ProbeData):
    """Rows of an ImageNet-normalised ``[N, 3, H, W]`` float32 ``.npy`` with labels from a CSV.

    Args:
        images_npy: e.g. ``<data_npy>/val/cxr_val.npy`` (memory-mapped; only the chosen rows are read).
        labels_csv: the label table; row ``i`` labels array row ``i`` unless ``index_column`` is given.
        label: the label column; rows not labelled 0/1 are dropped.
        index_column: a column holding each CSV row's array row (0-based), for a CSV in another order.
        img_size: side of the square resize (antialias, no renormalisation: the Symile ``resize``).
        max_samples / seed: at most this many rows, drawn with ``default_rng(seed)``.
    """

    def __init__(self, images_npy: str, labels_csv: str, label: str, index_column: str | None = None,
                 img_size: int = 224, max_samples: int = 1000, seed: int = 0) -> None:
        self.images_npy, self.labels_csv, self.label = images_npy, labels_csv, label
        self.index_column, self.img_size = index_column, img_size
        self.max_samples, self.seed = max_samples, seed

    def _array_rows(self, df: pd.DataFrame, n: int) -> np.ndarray:
        """The array row of each CSV row."""
        if self.index_column is None:
            if len(df) != n:
                raise ManifestError(f"{self.labels_csv} has {len(df)} rows but {self.images_npy} has {n}: "
                                    "without index_column the rows must align one to one")
            return np.arange(n)
        index = pd.to_numeric(df[self.index_column], errors="coerce").to_numpy()
        bad = ~np.isfinite(index) | (index < 0) | (index >= n) | (index != np.round(index))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = str(df[self.index_column].iat[row])
            raise ManifestError(f"{self.labels_csv}: row {row}: column {self.index_column!r} holds "
                                f"{value!r}, not a row of {self.images_npy} (0..{n - 1})")
        return index.astype(np.int64)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        arr = open_npy(Path(self.images_npy))
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise SymileFileError(f"{self.images_npy}: expected images of shape [N, 3, H, W], "
                                  f"got {list(arr.shape)}")
        required = [self.label] + ([self.index_column] if self.index_column else [])
        df = read_manifest(self.labels_csv, required)
        array_rows = self._array_rows(df, len(arr))
        rows, labels = binary_rows(df[self.label], self.labels_csv, self.label)
        take = seeded_subset(len(rows), self.max_samples, self.seed)
        picked, labels = array_rows[rows[take]], labels[take]
        check_classes(labels, self.labels_csv, self.label)
        order = np.argsort(picked, kind="stable")  # read the memory map in ascending row order
        picked, labels = picked[order], labels[order]
        resize = resize_normalized(self.img_size)
        chunks = [resize(torch.from_numpy(np.array(arr[picked[i:i + RESIZE_CHUNK]], dtype=np.float32)))
                  for i in range(0, len(picked), RESIZE_CHUNK)]
        log.info("probe data %s: %d rows, %d positive for %r (%s)", self.images_npy, len(labels),
                 labels.sum(), self.label, self.labels_csv)
        return torch.cat(chunks), torch.from_numpy(labels)

"""Stage 3 classification DataModule over any classification entry of the benchmark registry.

Reads the converter's manifests (``scripts/prepare.py <benchmark>``) from ``manifest_dir``, opens images
under ``<root>/<spec.image_dirs[split]>/<spec.path_column>`` (DATASETS.md §1.1) and applies §1.2
transforms: train = square resize + horizontal flip, val/test = square resize, ImageNet norm.

Targets: binary / multilabel give float vectors ``[K]`` (the spec's label columns); multiclass gives a long
class index (``index``: the ``Label`` column, checked to lie in ``0..C-1``; ``onehot``: the argmax of
the one-hot columns, each row checked to hold exactly one 1). A bad row is an error naming the CSV and row.

``train_fraction < 1`` subsamples the train manifest only with :func:`pacx.data.lowdata.low_data_subset`
(at least one positive per label; for an ``index`` task one row per class, via indicator columns).
``batch_size`` is the global batch; each device loads ``batch_size / world_size``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pacx.data.common import per_device_batch_size
from pacx.data.lowdata import indicator_columns, low_data_subset
from pacx.data.manifest import ImageManifestDataset, ManifestError, read_manifest
from pacx.data.registry import INDEX_COLUMN, SPLITS, BenchmarkSpec, get_benchmark
from pacx.data.transforms import resize_eval, resize_flip_train

log = logging.getLogger(__name__)


def _index_targets(df: pd.DataFrame, spec: BenchmarkSpec, source: str) -> torch.Tensor:
    try:
        indicator_columns(df, INDEX_COLUMN, len(spec.labels))  # validates every row
    except ValueError as err:
        raise ManifestError(f"{source}: {err}") from err
    return torch.as_tensor(pd.to_numeric(df[INDEX_COLUMN]).to_numpy(dtype=np.int64))


def _onehot_targets(df: pd.DataFrame, spec: BenchmarkSpec, source: str) -> torch.Tensor:
    values = df[list(spec.labels)].apply(pd.to_numeric, errors="coerce").fillna(0).to_numpy()
    bad = (values.sum(axis=1) != 1) | ~np.isin(values, (0, 1)).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ManifestError(f"{source}: row {row}: one-hot columns {list(spec.labels)} hold "
                            f"{values[row].tolist()}, not exactly one 1")
    return torch.as_tensor(values.argmax(axis=1), dtype=torch.long)


# label_source -> (manifest DataFrame, spec, source) -> long class indices [N]; other sources keep vectors.
MULTICLASS_TARGETS = {"index": _index_targets, "onehot": _onehot_targets}


def subset_columns(df: pd.DataFrame, spec: BenchmarkSpec) -> tuple[pd.DataFrame, list[str]]:
    """The table and the 0/1 columns that the low-data subsampler guarantees a positive for."""
    if spec.label_source == "index":
        return indicator_columns(df, INDEX_COLUMN, len(spec.labels))
    return df, list(spec.label_columns)


class SplitsDataModule(pl.LightningDataModule):
    """Base of the Stage 3 data modules: one dataset per split of the benchmark (:meth:`build_dataset`),
    the global batch split across devices, train shuffled, nothing dropped (DATASETS.md §1.2)."""

    def build_dataset(self, split: str):
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        self.per_device_batch = per_device_batch_size(self.hparams.batch_size, self.trainer)
        for split in SPLITS:
            if split not in self.datasets:
                self.datasets[split] = self.build_dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        h = self.hparams
        return DataLoader(self.datasets[split], batch_size=self.per_device_batch, shuffle=shuffle, drop_last=False,
                          num_workers=h.num_workers, pin_memory=h.pin_memory, persistent_workers=h.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class BenchmarkDataModule(SplitsDataModule):
    """Images + targets of one classification benchmark (DATASETS.md §1).

    Args:
        benchmark: registry name (``pacx.data.registry.BENCHMARKS``).
        root: the image root (the release folder the converter read).
        manifest_dir: where the converter wrote the split CSVs.
        batch_size: the **global** batch (DATASETS.md §15: the spec's ``lp_batch_size``, set in the config).
        num_workers, pin_memory: DataLoader settings.
        img_size: square resize size.
        train_fraction / subset_seed: low-data subset of the train split (DATASETS.md §14).
    """

    def __init__(
        self,
        benchmark: str,
        root: str,
        manifest_dir: str,
        batch_size: int,
        num_workers: int = 16,
        img_size: int = 224,
        train_fraction: float = 1.0,
        subset_seed: int = 0,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spec = get_benchmark(benchmark)
        if self.spec.task == "segmentation":
            raise ValueError(f"{benchmark} is a segmentation benchmark, not classification")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        self.per_device_batch = batch_size
        self.datasets: dict[str, ImageManifestDataset] = {}

    def manifest(self, split: str) -> tuple[pd.DataFrame, str]:
        path = Path(self.hparams.manifest_dir) / self.spec.manifest_files[split]
        df = read_manifest(path, [self.spec.path_column, *self.spec.label_columns])
        if split == "train" and self.hparams.train_fraction < 1.0:
            table, columns = subset_columns(df, self.spec)
            df = low_data_subset(table, columns, self.hparams.train_fraction, self.hparams.subset_seed)[df.columns]
        return df, str(path)

    def build_dataset(self, split: str) -> ImageManifestDataset:
        h, spec = self.hparams, self.spec
        df, source = self.manifest(split)
        transform = resize_flip_train(h.img_size) if split == "train" else resize_eval(h.img_size)
        ds = ImageManifestDataset(df, Path(h.root) / spec.image_dirs[split], spec.path_column, spec.label_columns,
                                  transform, source=source)
        if spec.label_source in MULTICLASS_TARGETS:
            ds.labels = MULTICLASS_TARGETS[spec.label_source](ds.df, spec, source)  # long [N]
        log.info("%s %s: %d images (%s)", spec.name, split, len(ds), source)
        return ds


"""Stage 3 data modules: benchmark splits served to the evaluation modules (docs/datasets.md#classification).

:class:`SplitsDataModule` is the base of every Stage 3 data module (the segmentation one too);
:class:`BenchmarkDataModule` serves any classification entry of the registry from the converter's manifests
(``scripts/prepare.py <benchmark>``). ``batch_size`` is the global batch; ``train_fraction < 1`` subsamples
the train split (:mod:`pacx.data.lowdata`). Targets, features and ``predict``: docs/design.md#stage-3-data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from pacx.data.common import eval_loader, per_device_batch_size
from pacx.data.feature_cache import FeatureDataset, FlipFeatureDataset
from pacx.data.images import find_images
from pacx.data.lowdata import indicator_columns, low_data_subset
from pacx.data.manifest import ImageManifestDataset, ManifestError, read_manifest, row_ref
from pacx.data.registry import INDEX_COLUMN, SPLITS, BenchmarkSpec, get_benchmark
from pacx.data.resumable import GLOBAL_SEED_ENV, train_loader
from pacx.data.transforms import CLASSIFY_HFLIP, resize_eval, resize_flip_train

log = logging.getLogger(__name__)

_CSV_ROW = "_csv_row"  # a low-data subset's column holding the manifest row numbers


def _index_targets(df: pd.DataFrame, spec: BenchmarkSpec, source: str) -> torch.Tensor:
    try:
        indicator_columns(df, INDEX_COLUMN, len(spec.labels))  # validates every row
    except ValueError as err:
        raise ManifestError(f"{source}: {err}") from err
    return torch.from_numpy(pd.to_numeric(df[INDEX_COLUMN]).to_numpy(dtype=np.int64, copy=True))


def _onehot_targets(df: pd.DataFrame, spec: BenchmarkSpec, source: str) -> torch.Tensor:
    values = df[list(spec.labels)].apply(pd.to_numeric, errors="coerce").fillna(0).to_numpy()
    bad = (values.sum(axis=1) != 1) | ~np.isin(values, (0, 1)).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        csv_row = df["_row"].iat[row] if "_row" in df.columns else row  # ImageManifestDataset: the CSV row
        raise ManifestError(f"{source}: {row_ref(csv_row)}: one-hot columns {list(spec.labels)} hold "
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
    the global batch split across devices, train shuffled, nothing dropped (docs/datasets.md#transforms).

    ``Stage3_eval.py`` takes any subclass (``data.class_path``); the model reads ``spec`` from it.
    """

    spec: BenchmarkSpec

    def build_dataset(self, split: str):
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.hparams.batch_size is None:
            raise ValueError(f"{self.spec.name}: set data.batch_size (the global batch)")
        self.per_device_batch = per_device_batch_size(self.hparams.batch_size, self.trainer)
        if stage == "predict":
            return
        for split in SPLITS:
            if split not in self.datasets:
                self.datasets[split] = self.build_dataset(split)

    def required(self, name: str) -> str:
        """The hparam ``name`` (a path), which fit / validate / test need: a clear error when unset."""
        value = self.hparams.get(name)
        if not value:
            raise ValueError(f"{self.spec.name}: set data.{name} (needed to fit, validate or test)")
        return value

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        h = self.hparams
        kwargs = dict(num_workers=h.num_workers, pin_memory=h.pin_memory,
                      persistent_workers=h.num_workers > 0)
        # training: exactly resumable order and augmentations (pacx.data.resumable); keeps the tail
        if shuffle:
            return train_loader(dataset, self.per_device_batch, self.trainer, drop_last=False,
                                augmented=getattr(dataset, "augmented", True), **kwargs)
        return eval_loader(dataset, self.per_device_batch, self.trainer, **kwargs)  # each row once under DDP

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], shuffle=False)


def images_table(source: Path, path_column: str, root: str | None = None) -> tuple[pd.DataFrame, Path]:
    """A folder (its images, sorted by relative path, searched recursively; the folder is the root) or a
    manifest CSV (paths relative to ``root``, default the CSV's folder; absolute paths stay) as
    ``(table, image root)``."""
    if source.is_dir():
        return pd.DataFrame({path_column: find_images(source)}), source
    return read_manifest(source, [path_column]), Path(root) if root else source.parent


class BenchmarkDataModule(SplitsDataModule):
    """Images + targets of one classification benchmark (docs/datasets.md#classification).

    Args:
        benchmark: registry name (``pacx.data.registry.BENCHMARKS``).
        root: the image root (the release folder the converter read); needed by fit / validate / test.
        manifest_dir: where the converter wrote the split CSVs; needed by fit / validate / test.
        batch_size: the **global** batch, a training choice of the config
            (``configs/stage3/linear_probe.yaml`` and the benchmark's override); needed by ``setup`` (None
            only for callers that build datasets themselves).
        num_workers, pin_memory: DataLoader settings.
        img_size: square resize size.
        train_augment: the horizontal flip of docs/datasets.md#transforms on train images. A cached-feature
            linear probe computes every split's features once under the evaluation transform; with the
            flip-aware cache (``model.feature_cache: flip``, the default) and ``train_augment`` the train
            split also stores each image's flipped features and draws the flip per sample per epoch, as the
            image path does.
        train_fraction / subset_seed: low-data subset of the train split (docs/datasets.md#low-data); the
            subset seed defaults to the run's ``seed_everything`` value, as in the reference (one seed drives
            both).
        manifest: ``predict`` only: a CSV of images (paths relative to ``root`` if set, else to the CSV's
            folder) or a folder of images (sorted by path) to embed, in row order.
        predict_path_column: the image column of ``manifest`` (default: the benchmark's path column).
    """

    def __init__(
        self,
        benchmark: str,
        root: str | None = None,
        manifest_dir: str | None = None,
        batch_size: int | None = None,
        num_workers: int = 16,
        img_size: int = 224,
        train_augment: bool = True,
        train_fraction: float = 1.0,
        subset_seed: int | None = None,
        pin_memory: bool = True,
        manifest: str | None = None,
        predict_path_column: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spec = get_benchmark(benchmark)
        if self.spec.task == "segmentation":
            raise ValueError(f"{benchmark} is a segmentation benchmark, not classification")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        self.per_device_batch = batch_size
        self.datasets: dict[str, Dataset] = {}
        self.predict_table: pd.DataFrame | None = None

    @property
    def subset_seed(self) -> int:
        if self.hparams.subset_seed is not None:
            return self.hparams.subset_seed
        seed = os.environ.get(GLOBAL_SEED_ENV)
        if seed is None:
            raise ValueError("set data.subset_seed or seed_everything: the low-data subset needs a seed")
        return int(seed)

    def manifest_table(self, split: str) -> tuple[pd.DataFrame, str]:
        path = Path(self.required("manifest_dir")) / self.spec.manifest_files[split]
        df = read_manifest(path, [self.spec.path_column, *self.spec.label_columns])
        if split == "train" and self.hparams.train_fraction < 1.0:
            table, columns = subset_columns(df, self.spec)
            # the subset keeps the CSV's row numbers as its index, so errors name the manifest's rows
            subset = low_data_subset(table.reset_index(names=_CSV_ROW), columns, self.hparams.train_fraction,
                                     self.subset_seed)
            df = subset.set_index(_CSV_ROW).rename_axis(None)[df.columns]
        return df, str(path)

    def build_dataset(self, split: str, augment: bool | None = None) -> ImageManifestDataset:
        """The split's images and targets; ``augment`` (default: ``train_augment`` on train) adds the flip."""
        h, spec = self.hparams, self.spec
        df, source = self.manifest_table(split)
        augment = (split == "train" and h.train_augment) if augment is None else augment
        transform = resize_flip_train(h.img_size) if augment else resize_eval(h.img_size)
        ds = ImageManifestDataset(df, Path(self.required("root")) / spec.image_dirs[split], spec.path_column,
                                  spec.label_columns, transform, source=source, label_fill=spec.label_fill)
        if spec.label_source in MULTICLASS_TARGETS:
            ds.labels = MULTICLASS_TARGETS[spec.label_source](ds.df, spec, source)  # long [N]
        log.info("%s %s: %d images (%s)", spec.name, split, len(ds), source)
        return ds

    def serve_features(self, features: Callable[[str, ImageManifestDataset, bool], torch.Tensor],
                       flip: bool = False) -> None:
        """From now on every split yields ``(feature [D], target)``: ``features(split, dataset, with_flip)``
        gets each split's images under the deterministic evaluation transform and returns ``[N, D]``, or
        ``[N, 2D]`` (image | flipped image) when ``with_flip``, which is asked for the train split when
        ``flip`` and ``train_augment`` are set; that split then draws the flip per sample and epoch
        (``FlipFeatureDataset``)."""
        for split in SPLITS:
            ds = self.build_dataset(split, augment=False)
            if split == "train" and flip and self.hparams.train_augment:
                self.datasets[split] = FlipFeatureDataset(features(split, ds, True), ds.labels,
                                                          CLASSIFY_HFLIP)
            else:
                self.datasets[split] = FeatureDataset(features(split, ds, False), ds.labels)

    def predict_dataloader(self) -> DataLoader:
        """Images of ``manifest`` (CSV or folder) in row order under the evaluation transform."""
        h = self.hparams
        if not h.manifest:
            raise ValueError("predict needs data.manifest: a CSV of image paths or a folder of images")
        column = h.predict_path_column or self.spec.path_column
        df, root = images_table(Path(h.manifest), column, h.root)
        self.predict_table = df
        ds = ImageManifestDataset(df, root, column, (), resize_eval(h.img_size), source=str(h.manifest))
        log.info("predict: %d images from %s", len(ds), h.manifest)
        return self._loader(ds, shuffle=False)

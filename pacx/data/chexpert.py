"""CheXpert for Stage 1 (docs/datasets.md#chexpert): release -> manifests, and the MAE DataModule.

Reads CheXpert-v1.0-small (``train.csv`` / ``valid.csv``), with the train rows and labels taken from
Stanford's ``train_visualCheXbert.csv`` (0/1 labels, as the reference) when it lies in the release folder or
is given; the manifests drop the first two components of ``Path``, order the columns as
docs/datasets.md#chexpert lists them and keep lateral views unless ``frontal_only``. Labels are unused by
the MAE. Rows keep their index in the source CSV, so errors name the row and line of the file they came
from; a split without rows is an error naming its CSV.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pacx.data.batched import BatchedCropFlip, BatchedResize, normalize_batch
from pacx.data.cache import CachedImageDataset, CacheError, ImageCache
from pacx.data.common import eval_loader, per_device_batch_size
from pacx.data.converters.base import Converter, ConverterOption, converter
from pacx.data.manifest import (
    ImageManifestDataset,
    ManifestError,
    read_manifest,
    require_paths,
    require_rows,
    row_ref,
)
from pacx.data.resumable import train_loader
from pacx.data.transforms import mae_train, resize_eval

log = logging.getLogger(__name__)

META_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
# visualCheXbert order (docs/datasets.md#chexpert), the column order of our manifests.
LABELS = [
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices", "No Finding",
]
RELEASE_CSVS = {"train": "train.csv", "val": "valid.csv"}
VISUALCHEXBERT_CSV = "train_visualCheXbert.csv"  # Stanford AIMI's train labels (downloaded separately)
MANIFESTS = {"train": "chexpert_train_split.csv", "val": "chexpert_val_split.csv"}
IMAGE_DIRS = {"train": "train", "val": "valid"}
RELEASE_SUBDIR = "CheXpert-v1.0-small"


def find_release_root(root: str | Path) -> Path:
    """``root`` itself, or its ``CheXpert-v1.0-small`` child, whichever holds ``train.csv``."""
    root = Path(root)
    for candidate in (root, root / RELEASE_SUBDIR):
        if (candidate / RELEASE_CSVS["train"]).is_file():
            return candidate
    raise FileNotFoundError(
        f"no CheXpert release at {root}: expected {root / 'train.csv'} (or under {RELEASE_SUBDIR}/)"
    )


def convert_split(csv_path: Path, frontal_only: bool = False) -> pd.DataFrame:
    """One release CSV -> manifest DataFrame (path rewrite, column order, optional frontal filter)."""
    df = read_manifest(csv_path, META_COLUMNS + LABELS)
    require_paths(df, "Path", str(csv_path))
    parts = df["Path"].astype(str).str.split("/")
    short = parts.map(len) < 3
    if short.any():
        row = int(short.idxmax())
        raise ManifestError(
            f"{csv_path}: {row_ref(row)}: Path {df['Path'].at[row]!r} lacks the '<release>/<split>/' prefix"
        )
    df = df.assign(Path=parts.str[2:].str.join("/"))[META_COLUMNS + LABELS]
    if frontal_only:
        df = df[df["Frontal/Lateral"] == "Frontal"]
    return df  # the index stays the release CSV's row (error messages name it)


def train_labels_csv(release: Path, train_labels: str | Path | None = None) -> Path:
    """The CSV the train manifest is built from: ``train_labels`` if given (an error naming it when it does
    not exist), else ``train_visualCheXbert.csv`` in the release folder, else the release's ``train.csv``
    (its labels are 1 / 0 / -1 / blank, not the reference's 0 / 1; the MAE does not read them)."""
    if train_labels is not None:
        path = Path(train_labels)
        if not path.is_file():
            raise FileNotFoundError(f"train labels CSV not found: {path}")
        return path
    visual = release / VISUALCHEXBERT_CSV
    return visual if visual.is_file() else release / RELEASE_CSVS["train"]


def convert_release(root: str | Path, frontal_only: bool = False,
                    train_labels: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """``{"train", "val"}`` manifests of the release at ``root``; the train rows come from
    :func:`train_labels_csv`."""
    release = find_release_root(root)
    sources = release_sources(release, train_labels)
    return {split: convert_split(path, frontal_only) for split, path in sources.items()}


def release_sources(release: Path, train_labels: str | Path | None = None) -> dict[str, Path]:
    """The CSV each split's manifest comes from (logged)."""
    sources = {"train": train_labels_csv(release, train_labels), "val": release / RELEASE_CSVS["val"]}
    log.info("CheXpert train rows and labels from %s%s", sources["train"],
             "" if sources["train"].name != RELEASE_CSVS["train"] else
             f" (no {VISUALCHEXBERT_CSV} there: the release's labels, unused by the MAE)")
    return sources


def summarize(manifests: dict[str, pd.DataFrame]) -> dict:
    return {
        split: {"rows": len(df), **df["Frontal/Lateral"].value_counts().rename(str.lower).to_dict()}
        for split, df in manifests.items()
    }


CONVERTERS: list[Converter] = []  # this module's converters (pacx.data.prepare gathers them)


@converter(
    CONVERTERS, "chexpert", task="mae", metric="val/loss",
    description="CheXpert-v1.0-small (Stage 1 MAE pretraining)",
    options=(ConverterOption("--frontal-only", "keep frontal views only (default: all views)"),
             ConverterOption("--train-labels", f"the train CSV (default: {VISUALCHEXBERT_CSV} in the release "
                             "folder if there, else train.csv)", is_flag=False, default=None)),
)
def prepare_chexpert(raw: Path, out: Path, frontal_only: bool = False,
                     train_labels: str | None = None) -> dict:
    manifests = convert_release(raw, frontal_only, train_labels)
    for split, df in manifests.items():
        df.to_csv(out / MANIFESTS[split], index=False)
    return {"files": [str(out / MANIFESTS[s]) for s in manifests], **summarize(manifests)}


class CheXpertDataModule(pl.LightningDataModule):
    """CheXpert images for MAE pretraining.

    Args:
        root: the release root (holding ``train.csv``, ``valid.csv``, ``train/``, ``valid/``), or its parent.
        manifest_dir: manifests written by ``scripts/prepare.py chexpert``; ``None`` converts in memory.
        frontal_only: drop lateral views (the reference keeps them).
        fraction: seeded random fraction of the training rows.
        batch_size: the **global** batch; the per-device batch is derived from the world size.
        img_size / crop_scale / hflip: the MAE train transform (RandomResizedCrop, flip, ImageNet norm).
        skip_unreadable: drop missing / corrupt images up front (logged) instead of failing.
        train_cache / val_cache: image caches of ``scripts/build_image_cache.py`` (keys = manifest
            ``Path`` values; the val cache at ``img_size``, else a CacheError). With a cache, crops/flips run
            per batch in uint8 in the workers and batches are normalised after the transfer to the device
            (``on_after_batch_transfer``).
    """

    def __init__(
        self,
        root: str,
        manifest_dir: str | None = None,
        frontal_only: bool = False,
        fraction: float = 1.0,
        batch_size: int = 512,
        num_workers: int = 8,
        img_size: int = 224,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.5,
        skip_unreadable: bool = False,
        seed: int = 0,
        pin_memory: bool = True,
        train_cache: str | None = None,
        val_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.per_device_batch = batch_size
        self.datasets: dict[str, ImageManifestDataset | CachedImageDataset] = {}
        self.collate_fns: dict[str, object] = {}

    def manifests(self) -> dict[str, tuple[pd.DataFrame, str]]:
        h = self.hparams
        if h.manifest_dir is None:
            release = find_release_root(h.root)  # the CSVs' real folder (``CheXpert-v1.0-small/`` included)
            sources = release_sources(release)
            return {split: (convert_split(path, h.frontal_only), str(path))
                    for split, path in sources.items()}
        out = {}
        for split, name in MANIFESTS.items():
            path = Path(h.manifest_dir) / name
            df = read_manifest(path, ["Path", "Frontal/Lateral"])
            if h.frontal_only:
                df = df[df["Frontal/Lateral"] == "Frontal"]
            out[split] = (df, str(path))
        return out

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        self.per_device_batch = per_device_batch_size(h.batch_size, self.trainer)
        if self.datasets:
            return
        release = find_release_root(h.root)
        transforms = {"train": mae_train(h.img_size, h.crop_scale, h.hflip), "val": resize_eval(h.img_size)}
        batched = {"train": BatchedCropFlip(h.img_size, h.crop_scale, hflip=h.hflip),
                   "val": BatchedResize(h.img_size)}
        caches = {"train": h.train_cache, "val": h.val_cache}
        for split, (df, source) in self.manifests().items():
            if split == "train" and h.fraction < 1.0:
                df = df.sample(frac=h.fraction, random_state=h.seed).sort_index()
            require_rows(len(df), source if split != "train" or h.fraction == 1.0
                         else f"{source} (fraction {h.fraction})")
            if caches[split]:
                require_paths(df, "Path", source)
                cache = ImageCache(caches[split])
                if split == "val" and cache.size != h.img_size:
                    raise CacheError(f"{cache.directory}: {cache.size} px images, but img_size {h.img_size}: "
                                     "a validation cache must be built at img_size (its pixels are then the "
                                     "uncached evaluation resize's; docs/design.md#image-cache)")
                self.datasets[split] = CachedImageDataset(cache, df["Path"].astype(str).tolist())
                self.collate_fns[split] = batched[split]
                source = (f"{source} via cache {caches[split]}, decoded from "
                          f"{cache.image_root or 'an image root it does not record'}")
            else:
                self.datasets[split] = ImageManifestDataset(
                    df, release / IMAGE_DIRS[split], "Path", (), transforms[split], source=source,
                    skip_unreadable=h.skip_unreadable,
                )
            log.info("CheXpert %s: %d images (%s)", split, len(self.datasets[split]), source)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        h = self.hparams
        kwargs = dict(num_workers=h.num_workers, pin_memory=h.pin_memory,
                      persistent_workers=h.num_workers > 0, collate_fn=self.collate_fns.get(split))
        if shuffle:  # training: exactly resumable order and augmentations (pacx.data.resumable)
            return train_loader(self.datasets[split], self.per_device_batch, self.trainer, **kwargs)
        # validation: each row once under DDP, so val/loss does not depend on the device count
        return eval_loader(self.datasets[split], self.per_device_batch, self.trainer, **kwargs)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Cached batches arrive as uint8 [B, C, H, W]: normalise them here, on the device."""
        images, labels = batch
        if images.dtype == torch.uint8:
            images = normalize_batch(images)
        return images, labels

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

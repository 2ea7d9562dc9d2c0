"""Generic CSV-manifest image dataset (DATASETS.md §1.1), reused by every stage.

A manifest is a CSV with a path column (relative to an image root) and optional label columns. Images
open with PIL and become 3-channel RGB whatever their mode. Bad input fails loudly: a missing column
names the CSV and the column; a missing or unreadable image names the CSV row and the path. With
``skip_unreadable=True`` such rows are dropped up front instead, and their count and paths are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A manifest or an image it names is unusable; the message names the file, row and column."""


def read_manifest(csv_path: str | Path, required_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read a manifest CSV (or TSV by extension) and check that the required columns exist."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"manifest not found: {csv_path}")
    sep = "\t" if csv_path.suffix.lower() in {".tsv", ".tab"} else ","
    try:
        df = pd.read_csv(csv_path, sep=sep)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise ManifestError(f"{csv_path}: cannot parse manifest: {err}") from err
    missing = [c for c in required_columns if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{csv_path}: missing required column(s) {missing}; columns present: {list(df.columns)}"
        )
    return df


def clean_labels(df: pd.DataFrame, label_columns: Sequence[str], source: str) -> np.ndarray:
    """Label columns -> [N, K] int64: numeric coercion, NaN logged and filled with 0 (DATASETS.md §1.1)."""
    if not label_columns:
        return np.zeros((len(df), 0), dtype=np.int64)
    values = df[list(label_columns)].apply(pd.to_numeric, errors="coerce")
    n_nan = int(values.isna().sum().sum())
    if n_nan:
        log.warning("%s: %d empty or non-numeric label cells filled with 0", source, n_nan)
    return np.array(values.fillna(0), dtype=np.int64)  # a writable copy (pandas may hand out read-only views)


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


class ImageManifestDataset(Dataset):
    """(image, label vector) pairs from a manifest.

    Returns ``(transform(PIL RGB image), float32 labels [K])``; with no transform the image is the PIL
    image. ``source`` (the CSV name) and the original row index appear in every error message.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        image_root: str | Path,
        path_column: str,
        label_columns: Sequence[str] = (),
        transform: Callable | None = None,
        source: str = "<manifest>",
        skip_unreadable: bool = False,
        check_files: bool = True,
    ) -> None:
        missing = [c for c in (path_column, *label_columns) if c not in df.columns]
        if missing:
            raise ManifestError(f"{source}: missing required column(s) {missing}")
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"{source}: image root is not a directory: {self.image_root}")
        self.source = source
        self.path_column = path_column
        self.label_columns = list(label_columns)
        self.transform = transform
        df = df.reset_index(drop=False).rename(columns={"index": "_row"})
        if skip_unreadable:
            df = self._drop_unreadable(df)
        elif check_files:
            self._check_exist(df)
        self.df = df.reset_index(drop=True)
        self.rows = self.df["_row"].to_numpy()
        self.paths = self.df[path_column].astype(str).tolist()
        self.labels = torch.from_numpy(clean_labels(self.df, self.label_columns, source)).float()

    def _check_exist(self, df: pd.DataFrame) -> None:
        paths = df[self.path_column].astype(str)
        exists = np.fromiter((self.image_root.joinpath(p).is_file() for p in paths), bool, len(paths))
        if not exists.all():
            bad = np.flatnonzero(~exists)
            first = ", ".join(f"row {df['_row'].iat[i]}: {self.image_root / paths.iat[i]}" for i in bad[:5])
            raise ManifestError(
                f"{self.source}: {len(bad)} image(s) not found under {self.image_root} (first: {first}); "
                "fix the manifest or image root, or set skip_unreadable to drop them"
            )

    def _drop_unreadable(self, df: pd.DataFrame) -> pd.DataFrame:
        keep = []
        dropped = []
        for i, rel in enumerate(df[self.path_column].astype(str)):
            path = self.image_root / rel
            try:
                with Image.open(path) as img:
                    img.load()
                keep.append(i)
            except (OSError, ValueError) as err:
                dropped.append(f"row {df['_row'].iat[i]}: {path} ({err.__class__.__name__})")
        if dropped:
            log.warning(
                "%s: skip_unreadable dropped %d of %d rows: %s",
                self.source, len(dropped), len(df), "; ".join(dropped),
            )
        return df.iloc[keep]

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> Image.Image:
        path = self.image_root / self.paths[index]
        try:
            return open_rgb(path)
        except (OSError, ValueError) as err:
            raise ManifestError(f"{self.source}: row {self.rows[index]}: cannot read image {path}: {err}") from err

    def __getitem__(self, index: int):
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[index]

"""Generic CSV-manifest image dataset (docs/datasets.md#manifests), reused by every stage.

A manifest is a CSV with a path column (relative to an image root) and optional label columns; images decode
through :func:`pacx.data.images.open_image` into RGB. A missing column, an empty manifest, a missing or
unreadable image, a blank path or a blank label is an error naming the CSV (and the row, its line and the
path), unless ``skip_unreadable`` or a ``label_fill`` policy says otherwise (docs/datasets.md#labels).
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

from pacx.data.images import ImageDecodeError, open_image

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


def row_ref(row: int) -> str:
    """A manifest row for error messages: the 0-based data row and its line in the CSV (header = line 1)."""
    return f"row {row} (line {int(row) + 2})"


def blank_paths(paths: pd.Series) -> pd.Series:
    """True where a path cell is blank: NaN / None (an empty CSV cell) or whitespace only. (``astype(str)``
    alone does not catch them: pandas 3 keeps NaN through it.)"""
    return paths.isna() | (paths.astype(str).str.strip() == "")


def require_paths(df: pd.DataFrame, column: str, source: str) -> None:
    """A blank path cell is an error naming the file and the first 5 rows (``df``'s index = the CSV row)."""
    blank = blank_paths(df[column]).to_numpy()
    if blank.any():
        first = ", ".join(row_ref(r) for r in df.index[blank][:5])
        raise ManifestError(f"{source}: {int(blank.sum())} row(s) with a blank {column} (first: {first}); "
                            "fix the manifest, or set skip_unreadable to drop them")


def require_rows(n: int, source: str, what: str = "rows") -> None:
    """An empty split is an error naming its file, never a run over nothing."""
    if n == 0:
        raise ManifestError(f"{source}: no {what}; an empty split cannot be trained or evaluated on")


def clean_labels(df: pd.DataFrame, label_columns: Sequence[str], source: str,
                 label_fill: int | None = None) -> np.ndarray:
    """Label columns -> [N, K] int64 by numeric coercion (docs/datasets.md#labels).

    A blank, NaN or non-numeric cell is a :class:`ManifestError` naming the first 5 rows and the count,
    unless ``label_fill`` is set (a benchmark's documented fill policy): then the cells get that value and
    their count is logged."""
    if not label_columns:
        return np.zeros((len(df), 0), dtype=np.int64)
    values = df[list(label_columns)].apply(pd.to_numeric, errors="coerce")
    blank = values.isna()
    n_nan = int(blank.to_numpy().sum())
    if n_nan and label_fill is None:
        rows = blank.any(axis=1)
        first = "; ".join(
            f"{row_ref(r)}: {[c for c in label_columns if blank.at[r, c]]}" for r in rows[rows].index[:5])
        raise ManifestError(f"{source}: {n_nan} blank or non-numeric label cell(s) in {int(rows.sum())} "
                            f"row(s) (first: {first}); fix the manifest (this benchmark declares no "
                            "fill policy)")
    if n_nan:
        log.warning("%s: %d blank or non-numeric label cells filled with %d (the benchmark's fill policy)",
                    source, n_nan, label_fill)
        values = values.fillna(label_fill)
    return np.array(values, dtype=np.int64)  # a writable copy (pandas may hand out read-only views)


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
        label_fill: int | None = None,
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
        require_rows(len(df), source)
        # the original row, whatever the columns are called (reset_index would take a column named "index")
        df = df.assign(_row=df.index.to_numpy()).reset_index(drop=True)
        if skip_unreadable:
            df = self._drop_unreadable(df)
            require_rows(len(df), source, "readable images (skip_unreadable dropped every row)")
        else:
            require_paths(df.set_index("_row"), path_column, source)
            if check_files:
                self._check_exist(df)
        self.df = df.reset_index(drop=True)
        self.rows = self.df["_row"].to_numpy()
        self.paths = self.df[path_column].astype(str).tolist()
        labels = clean_labels(self.df.set_index("_row"), self.label_columns, source, label_fill)
        self.labels = torch.from_numpy(labels).float()

    def _check_exist(self, df: pd.DataFrame) -> None:
        paths = df[self.path_column].astype(str)
        exists = np.fromiter((self.image_root.joinpath(p).is_file() for p in paths), bool, len(paths))
        if not exists.all():
            bad = np.flatnonzero(~exists)
            first = ", ".join(f"{row_ref(df['_row'].iat[i])}: {self.image_root / paths.iat[i]}"
                              for i in bad[:5])
            raise ManifestError(
                f"{self.source}: {len(bad)} image(s) not found under {self.image_root} (first: {first}); "
                "fix the manifest or image root, or set skip_unreadable to drop them"
            )

    def _drop_unreadable(self, df: pd.DataFrame) -> pd.DataFrame:
        keep = []
        dropped = []
        blank = blank_paths(df[self.path_column]).to_numpy()
        for i, rel in enumerate(df[self.path_column].astype(str)):
            if blank[i]:
                dropped.append(f"{row_ref(df['_row'].iat[i])}: blank {self.path_column}")
                continue
            path = self.image_root / rel
            try:
                open_image(path)
                keep.append(i)
            except (OSError, ValueError) as err:
                dropped.append(f"{row_ref(df['_row'].iat[i])}: {path} ({err.__class__.__name__})")
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
            return open_image(path, "RGB")
        except (OSError, ImageDecodeError) as err:
            raise ManifestError(f"{self.source}: {row_ref(self.rows[index])}: cannot read image {path}: "
                                f"{err}") from err

    def __getitem__(self, index: int):
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[index]

"""Segmentation benchmarks (docs/datasets.md#cxlseg, #covidqu, #qata): release -> image / mask manifests.

Each converter writes ``train.csv``, ``val.csv`` and ``test.csv`` into ``out``, with paths relative to the
dataset's image root, and returns a summary. Images are never opened (listing folders is allowed). An image
without its mask is never skipped silently: it is logged and reported under ``images_without_mask``. Release
layouts and split recipes: docs/design.md#converters.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from pacx.data.converters.base import Converter, ConverterOption, converter
from pacx.data.manifest import ManifestError, read_manifest
from pacx.progress import progress

log = logging.getLogger(__name__)

COLUMNS = ["img_path", "mask_path"]
SPLITS = ("train", "val", "test")
N_REPORTED = 5  # paths listed in a summary / log line

CXLSEG_SPLIT_FILES = ("CXLSeg-split.csv", "CXLSeg-split.tsv")
CXLSEG_COLUMNS = ["dicom_id", "subject_id", "study_id", "split"]
CXLSEG_SPLITS = {"train": "train", "validate": "val", "test": "test"}
CXLSEG_FILES_DIR = "files"

COVIDQU_SEG_SUBDIR = Path("Lung Segmentation Data", "Lung Segmentation Data")
COVIDQU_SPLITS = {"Train": "train", "Val": "val", "Test": "test"}
COVIDQU_CATEGORIES = ("COVID-19", "Non-COVID", "Normal")
COVIDQU_IMAGES, COVIDQU_MASKS = "images", "lung masks"

QATA_SUBDIR = "QaTa-COV19-v2"
QATA_TRAIN, QATA_TEST = "Train Set", "Test Set"
QATA_IMAGES, QATA_MASKS, QATA_MASK_PREFIX = "Images", "Ground-truths", "mask_"
QATA_VAL_SHARE = 0.1


# ----------------------------------------------------------------------------------------------- helpers

def write_split_csvs(frames: dict[str, pd.DataFrame], out: Path) -> list[str]:
    """Write ``<out>/{train,val,test}.csv`` with the manifest columns; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for split in SPLITS:
        path = out / f"{split}.csv"
        frames[split][COLUMNS].to_csv(path, index=False)
        files.append(str(path))
    return files


def report_unpaired(dataset: str, unpaired: list[str]) -> dict:
    """Log images without a mask (count and first paths) and return the summary entry."""
    if unpaired:
        log.warning("%s: %d image(s) without a mask left out (first: %s)",
                    dataset, len(unpaired), ", ".join(unpaired[:N_REPORTED]))
    return {"count": len(unpaired), "first": unpaired[:N_REPORTED]}


def find_root(raw: Path, candidates: Iterable[Path], marker: str, what: str) -> Path:
    """The first of ``candidates`` holding ``marker``; the error names every place looked at."""
    candidates = list(candidates)
    for candidate in candidates:
        if (candidate / marker).exists():
            return candidate
    looked = ", ".join(str(c / marker) for c in candidates)
    raise FileNotFoundError(f"no {what} under {raw}: looked for {looked}")


def list_pngs(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise FileNotFoundError(f"missing folder of the release: {folder}")
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.endswith(".png"))


def list_names(folder: Path) -> set[str]:
    if not folder.is_dir():
        raise FileNotFoundError(f"missing folder of the release: {folder}")
    return {e.name for e in os.scandir(folder) if e.is_file()}


def paired_rows(root: Path, image_dir: str, mask_dir: str,
                mask_prefix: str = "") -> tuple[pd.DataFrame, list[str]]:
    """Rows for the sorted ``*.png`` of ``root/image_dir`` whose ``mask_prefix + name`` is in
    ``root/mask_dir``.

    Both folders and all paths are relative to the image root ``root``. Returns the rows and the
    paths of the images without a mask.
    """
    images = list_pngs(root / image_dir)
    masks = list_names(root / mask_dir)
    rows, unpaired = [], []
    for name in images:
        img = f"{image_dir}/{name}"
        if mask_prefix + name in masks:
            rows.append((img, f"{mask_dir}/{mask_prefix}{name}"))
        else:
            unpaired.append(img)
    return pd.DataFrame(rows, columns=COLUMNS), unpaired


# ----------------------------------------------------------------------------------------------- CXL-Seg

def find_cxlseg_split_file(raw: Path) -> Path:
    """``raw`` itself when it is the split file, else ``CXLSeg-split.csv`` (or ``.tsv``) inside ``raw``."""
    if raw.is_file():
        return raw
    for name in CXLSEG_SPLIT_FILES:
        if (raw / name).is_file():
            return raw / name
    raise FileNotFoundError(f"no CXLSeg split file under {raw}: expected one of {list(CXLSEG_SPLIT_FILES)}")


def id_strings(df: pd.DataFrame, column: str, source: Path) -> pd.Series:
    """An id column as strings; integer columns stay integral (no ``.0``); empty cells name their row."""
    values = df[column]
    empty = values.isna()
    if empty.any():
        raise ManifestError(f"{source}: row {int(empty.idxmax())}: empty {column!r}")
    if pd.api.types.is_float_dtype(values):
        values = values.astype("int64")
    return values.astype(str).str.strip()


def convert_cxlseg(split_file: Path) -> dict[str, pd.DataFrame]:
    """The split file -> per-split manifests (plus a ``subject_id`` column, not written)."""
    df = read_manifest(split_file, CXLSEG_COLUMNS)
    unknown = sorted(set(df["split"].astype(str)) - set(CXLSEG_SPLITS))
    if unknown:
        row = int((~df["split"].astype(str).isin(list(CXLSEG_SPLITS))).idxmax())
        raise ManifestError(
            f"{split_file}: row {row}: unknown 'split' value(s) {unknown}; expected {sorted(CXLSEG_SPLITS)}"
        )
    dicom, subject, study = (id_strings(df, c, split_file) for c in CXLSEG_COLUMNS[:3])
    stem = "p" + subject.str[:2] + "/p" + subject + "/s" + study + "/" + dicom
    table = pd.DataFrame({"img_path": stem + ".jpg", "mask_path": stem + "-mask.jpg", "subject_id": subject,
                          "split": df["split"].astype(str).map(CXLSEG_SPLITS)})
    frames = {s: table[table["split"] == s].reset_index(drop=True) for s in SPLITS}
    return frames


def existing_files(root: Path) -> set[str]:
    """Every file under ``root`` as a ``/``-joined relative path (one directory walk)."""
    found = set()
    for dirpath, _, filenames in progress(os.walk(root), desc=f"list {root.name}/", unit="dir"):
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        found.update(prefix + f for f in filenames)
    return found


CONVERTERS: list[Converter] = []  # this module's converters (pacx.data.prepare gathers them)


@converter(
    CONVERTERS, "cxlseg", task="segmentation", metric="iou",
    description="CXLSeg lung masks on MIMIC-CXR (PhysioNet), official CXLSeg-split.csv",
    options=(ConverterOption("--check-files",
                             "drop (and report) rows whose image or mask is not under files/"),),
)
def prepare_cxlseg(raw: Path, out: Path, seed: int = 42, check_files: bool = False) -> dict:
    """``raw``: the release folder holding ``CXLSeg-split.csv`` (or ``.tsv``) and ``files/``, or the split
    file.

    ``seed`` is unused (official splits); it keeps the converter signature uniform.
    """
    raw = Path(raw)
    split_file = find_cxlseg_split_file(raw)
    frames = convert_cxlseg(split_file)
    summary: dict = {}
    if check_files:
        files_root = split_file.parent / CXLSEG_FILES_DIR
        if not files_root.is_dir():
            raise FileNotFoundError(f"--check-files: no image folder {files_root}")
        present = existing_files(files_root)
        missing: list[str] = []
        for split, df in frames.items():
            ok = df["img_path"].isin(present) & df["mask_path"].isin(present)
            for img, mask in zip(df["img_path"][~ok], df["mask_path"][~ok]):
                missing += [p for p in (img, mask) if p not in present]
            frames[split] = df[ok].reset_index(drop=True)
        if missing:
            log.warning("cxlseg: %d listed file(s) missing under %s, their rows left out (first: %s)",
                        len(missing), files_root, ", ".join(missing[:N_REPORTED]))
        summary["missing_files"] = {"count": len(missing), "first": missing[:N_REPORTED]}
    files = write_split_csvs(frames, Path(out))
    return {
        "files": files, "source": str(split_file),
        **{s: {"rows": len(f), "patients": int(f["subject_id"].nunique())} for s, f in frames.items()},
        **summary,
    }


# ----------------------------------------------------------------------------------------- COVID-QU-Ex

def find_covidqu_seg_root(raw: Path) -> Path:
    """``raw`` or the ``Lung Segmentation Data/Lung Segmentation Data`` below it, holding ``Train/``."""
    candidates = [raw / COVIDQU_SEG_SUBDIR, raw / COVIDQU_SEG_SUBDIR.name, raw]
    return find_root(raw, candidates, "Train", "COVID-QU-Ex lung segmentation data")


def convert_covidqu_seg(root: Path) -> tuple[dict[str, pd.DataFrame], list[str]]:
    frames, unpaired = {}, []
    for release_split, split in progress(COVIDQU_SPLITS.items(), desc="covidqu_seg", unit="split"):
        parts = []
        for category in COVIDQU_CATEGORIES:
            base = f"{release_split}/{category}"
            rows, missing = paired_rows(root, f"{base}/{COVIDQU_IMAGES}", f"{base}/{COVIDQU_MASKS}")
            parts.append(rows)
            unpaired += missing
        frames[split] = pd.concat(parts, ignore_index=True)
    return frames, unpaired


@converter(
    CONVERTERS, "covidqu_seg", task="segmentation", metric="iou",
    description="COVID-QU-Ex lung segmentation (Kaggle anasmohammedtahir/covidqu), official splits",
)
def prepare_covidqu_seg(raw: Path, out: Path, seed: int = 42) -> dict:
    """``raw``: the Kaggle download (or either ``Lung Segmentation Data`` level). ``seed`` is unused."""
    root = find_covidqu_seg_root(Path(raw))
    frames, unpaired = convert_covidqu_seg(root)
    files = write_split_csvs(frames, Path(out))
    return {"files": files, "image_root": str(root), **{s: {"rows": len(f)} for s, f in frames.items()},
            "images_without_mask": report_unpaired("covidqu_seg", unpaired)}


# -------------------------------------------------------------------------------------------- QaTa-COV19

def find_qata_root(raw: Path) -> Path:
    return find_root(raw, [raw / QATA_SUBDIR, raw], QATA_TRAIN, "QaTa-COV19-v2 release")


def convert_qata(root: Path, seed: int = 42) -> tuple[dict[str, pd.DataFrame], list[str]]:
    unpaired = []
    tables = {}
    for part in progress((QATA_TRAIN, QATA_TEST), desc="qata", unit="split"):
        rows, missing = paired_rows(root, f"{part}/{QATA_IMAGES}", f"{part}/{QATA_MASKS}", QATA_MASK_PREFIX)
        tables[part] = rows
        unpaired += missing
    if len(tables[QATA_TRAIN]) < 2:
        raise ManifestError(f"{root / QATA_TRAIN}: {len(tables[QATA_TRAIN])} paired image(s), "
                            "too few to split")
    train, val = train_test_split(tables[QATA_TRAIN], test_size=QATA_VAL_SHARE, random_state=seed,
                                  shuffle=True)
    frames = {"train": train.reset_index(drop=True), "val": val.reset_index(drop=True),
              "test": tables[QATA_TEST]}
    return frames, unpaired


@converter(
    CONVERTERS, "qata", task="segmentation", metric="iou",
    description="QaTa-COV19-v2 infection masks; Train Set split 90/10 (seed), official Test Set",
    options=(ConverterOption("--seed", "seed of the 90/10 train/val split (reference: 42)", is_flag=False,
                             default=42),),
)
def prepare_qata(raw: Path, out: Path, seed: int = 42) -> dict:
    """``raw``: the folder holding ``QaTa-COV19-v2/`` or that folder itself."""
    seed = int(seed)  # the CLI hands option values over as strings
    root = find_qata_root(Path(raw))
    frames, unpaired = convert_qata(root, seed)
    files = write_split_csvs(frames, Path(out))
    return {"files": files, "image_root": str(root), "seed": seed,
            **{s: {"rows": len(f)} for s, f in frames.items()},
            "images_without_mask": report_unpaired("qata", unpaired)}

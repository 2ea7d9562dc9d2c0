"""Overlap of Stage 2's Symile-MIMIC data with MIMIC-derived Stage 3 test splits (docs/datasets.md#leakage).

Holds every piece of the check: id files read without unpickling (:func:`load_id_file`), Symile's admissions
and patients (:func:`symile_ids`), counts per benchmark (:func:`overlap_report`), the Stage 2 record
``stage2_admissions.npz`` (:func:`record_stage2_admissions`, :func:`export_admissions`,
:func:`stage2_admissions`) and Stage 3's guard (:func:`check_stage3_overlap`; docs/design.md#leakage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open

from pacx.data.registry import BENCHMARKS

log = logging.getLogger(__name__)

ADMISSIONS_FILE = "stage2_admissions.npz"
EXPORT_SUFFIX = ".stage2_admissions.npz"
STAGE2_SPLITS = ("train", "val")
# A MIMIC-CXR(-JPG) image path: p<2 digits>/p<subject_id>/s<study_id>/...; the subject is the patient.
MIMIC_CXR_PATH = re.compile(r"(?:^|/)p\d{2}/p(\d+)/s\d+/")


class LeakageError(ValueError):
    """Test rows share admissions with what the backbone was distilled on, or the check cannot be made."""


# ---- ids ------------------------------------------------------------------------------------------------


def load_id_file(path: str | Path) -> np.ndarray:
    """A 1-D integer ``.npy`` of ids (e.g. ``hadm_id_train.npy``) as int64. Never unpickles: a file holding
    Python objects is refused with an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"id file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise LeakageError(f"{path}: refused, it holds pickled Python objects ({err}); an id file must be a "
                           "plain integer array (np.save of an int array)") from None
    except OSError as err:
        raise LeakageError(f"{path}: not a readable .npy file: {err}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise LeakageError(f"{path}: expected a 1-D integer array of ids (.npy), got an .npz archive")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise LeakageError(f"{path}: expected a 1-D integer array of ids, got {arr.dtype} {list(arr.shape)}")
    return arr.astype(np.int64)


def ids_sha256(ids: Mapping[str, np.ndarray]) -> str:
    """Content hash of named id sets: the sorted names, each with its sorted unique int64 ids."""
    h = hashlib.sha256()
    for name in sorted(ids):
        h.update(f"{name}|".encode())
        h.update(np.unique(np.asarray(ids[name], dtype=np.int64)).astype("<i8").tobytes())
    return h.hexdigest()


def symile_layout(root: str | Path) -> tuple[Path, Path]:
    """``(data_npy folder, release folder)`` of a Symile-MIMIC root given as either of them."""
    root = Path(root)
    if (root / "data_npy").is_dir():
        return root / "data_npy", root
    return root, root.parent


def _csv_subjects(csv: Path, hadm: np.ndarray) -> np.ndarray | None:
    """Patients of the release CSV's rows whose admission is in ``hadm``; None without that CSV."""
    if not csv.is_file():
        return None
    df = pd.read_csv(csv, usecols=lambda c: c in ("subject_id", "hadm_id"))
    if set(df.columns) != {"subject_id", "hadm_id"}:
        raise LeakageError(f"{csv}: expected columns subject_id and hadm_id, found {list(df.columns)}")
    rows = df["hadm_id"].astype("int64").isin(hadm)
    return np.unique(df.loc[rows, "subject_id"].astype("int64").to_numpy())


def symile_ids(root: str | Path, splits: tuple[str, ...] = STAGE2_SPLITS) -> dict[str, np.ndarray]:
    """``{"<split>_hadm_id": ids, "<split>_subject_id": ids (when the release CSV is there)}`` of Symile."""
    data_npy, release = symile_layout(root)
    out: dict[str, np.ndarray] = {}
    for split in splits:
        hadm = load_id_file(data_npy / split / f"hadm_id_{split}.npy")
        out[f"{split}_hadm_id"] = hadm
        subjects = _csv_subjects(release / f"{split}.csv", hadm)
        if subjects is not None:
            out[f"{split}_subject_id"] = subjects
    return out


def manifest_ids(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-row MIMIC ids of a manifest (-1 where blank): ``hadm_id`` and ``subject_id`` columns, the patient
    also from a path column of MIMIC-CXR-JPG paths; ``{}`` for a benchmark without MIMIC ids."""
    out: dict[str, np.ndarray] = {}
    for column in ("hadm_id", "subject_id"):
        if column in df.columns:
            out[column] = pd.to_numeric(df[column], errors="coerce").fillna(-1).astype("int64").to_numpy()
    if "subject_id" not in out:
        for column in (c for c in df.columns if "path" in c.lower()):
            found = df[column].astype(str).str.extract(MIMIC_CXR_PATH, expand=False)
            if len(df) and found.notna().all():
                out["subject_id"] = found.astype("int64").to_numpy()
                break
    return out


def overlap_counts(test: Mapping[str, np.ndarray],
                   reference: Mapping[str, np.ndarray]) -> dict[str, int | None]:
    """Test rows sharing an admission / a patient with each reference split; None where either lacks
    the id."""
    counts: dict[str, int | None] = {}
    for kind, column in (("admissions", "hadm_id"), ("patients", "subject_id")):
        for split in STAGE2_SPLITS:
            ref = reference.get(f"{split}_{column}")
            rows = test.get(column)
            counts[f"{kind}_{split}"] = None if ref is None or rows is None else int(np.isin(rows, ref).sum())
    return counts


def overlap_report(symile_root: str | Path, manifests: str | Path) -> list[dict]:
    """One entry per registry benchmark whose test manifest is under ``manifests`` (``<dir>/<name>/…``, or the
    folder itself when it is named after the benchmark): test rows, the id columns, and :func:`overlap_counts`
    against Symile's train and val splits (``ids: []`` where there are no MIMIC ids)."""
    reference = symile_ids(symile_root)
    manifests = Path(manifests)
    report = []
    for name, spec in BENCHMARKS.items():
        folder = manifests if manifests.name == name else manifests / name
        csv = folder / spec.manifest_files["test"]
        if not csv.is_file():
            continue
        df = pd.read_csv(csv)
        test = manifest_ids(df)
        entry = {"benchmark": name, "manifest": str(csv), "rows": int(len(df)), "ids": sorted(test)}
        if test:
            entry.update(overlap_counts(test, reference))
        report.append(entry)
    if not report:
        raise FileNotFoundError(f"no benchmark test manifest under {manifests} (expected "
                                "<dir>/<benchmark>/…, "
                                "as scripts/prepare.py --out writes them)")
    return report


# ---- the Stage 2 record -----------------------------------------------------------------------------------


def write_admissions(path: str | Path, ids: Mapping[str, np.ndarray]) -> str:
    """Save the id sets as an ``.npz`` (atomically, no pickles); returns their content hash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v, dtype=np.int64) for k, v in ids.items()})
    os.replace(tmp, path)
    return ids_sha256(ids)


def read_admissions(path: str | Path, sha256: str | None = None) -> dict[str, np.ndarray]:
    """The id sets of an admissions file; a hash that does not match ``sha256`` is an error naming the
    file."""
    with np.load(path, allow_pickle=False) as npz:
        ids = {k: npz[k].astype(np.int64) for k in npz.files}
    if sha256 is not None and ids_sha256(ids) != sha256:
        raise LeakageError(f"{path}: its ids hash to {ids_sha256(ids)[:12]}…, but the run recorded "
                           f"{sha256[:12]}…: the file was replaced; the overlap cannot be checked against it")
    return ids


def record_stage2_admissions(trainer, datamodule) -> dict | None:
    """Write ``<run_dir>/stage2_admissions.npz`` with the train / val admissions (and patients, when the
    Symile CSVs are present) of a Stage 2 fit; returns the record for ``run.json`` and the checkpoints."""
    datasets = getattr(datamodule, "datasets", {}) or {}
    root = getattr(datamodule, "hparams", {}).get("root")
    ids: dict[str, np.ndarray] = {}
    for role in STAGE2_SPLITS:
        ds = datasets.get(role)
        if ds is None or not hasattr(ds, "hadm_ids"):
            continue
        ids[f"{role}_hadm_id"] = np.asarray(ds.hadm_ids, dtype=np.int64)
        if root:
            subjects = _csv_subjects(symile_layout(root)[1] / f"{ds.split}.csv", ids[f"{role}_hadm_id"])
            if subjects is not None:
                ids[f"{role}_subject_id"] = subjects
    if "train_hadm_id" not in ids:
        log.warning("Stage 2: the data module names no train admissions; nothing recorded for "
                    "Stage 3's overlap check")
        return None
    path = Path(trainer.default_root_dir) / ADMISSIONS_FILE
    sha = ids_sha256(ids)
    if trainer.is_global_zero:
        write_admissions(path, ids)
    log.info("Stage 2 admissions (%s) recorded in %s, sha256 %s…",
             ", ".join(f"{k} {len(v)}" for k, v in ids.items()), path, sha[:12])
    return {"file": ADMISSIONS_FILE, "sha256": sha, "counts": {k: int(len(v)) for k, v in ids.items()}}


def _export_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _locate(weights: str | Path) -> tuple[str, Path | None] | None:
    """``(hash, file or None)`` of the admissions behind ``weights`` (run directory, a checkpoint inside one,
    or an export); None when the weights carry no record (not a pacx Stage 2 output)."""
    path = Path(weights)
    if path.suffix == ".safetensors":
        meta = _export_metadata(path)
        sha = meta.get("stage2_admissions_sha256")
        name = meta.get("stage2_admissions")
        return (sha, path.parent / name if name else None) if sha else None
    run_dir = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else None
    if run_dir is None or not (run_dir / "run.json").is_file():
        return None
    record = json.loads((run_dir / "run.json").read_text()).get("stage2_admissions")
    return (record["sha256"], run_dir / record["file"]) if record else None


def stage2_admissions(weights: str | Path) -> tuple[dict[str, np.ndarray], str] | None:
    """``(id sets, file)`` a Stage 2 output was trained on, or None when ``weights`` carries no record.
    A record whose file is gone or altered is an error naming it."""
    found = _locate(weights)
    if found is None:
        return None
    sha, file = found
    if file is None or not file.is_file():
        raise LeakageError(f"{weights} records Stage 2 admissions (sha256 {sha[:12]}…) but their file "
                           f"{file or '(not named in the export metadata)'} is missing; keep it "
                           "beside the weights")
    return read_admissions(file, sha), str(file)


def export_admissions(source: str | Path, out: str | Path) -> dict[str, str]:
    """Copy the admissions behind ``source`` beside the export ``out``; returns the export metadata entries
    (``stage2_admissions``: the copy's file name, ``stage2_admissions_sha256``), ``{}`` without a record."""
    found = _locate(source)
    if found is None:
        return {}
    sha, file = found
    if file is None or not file.is_file():
        log.warning("%s: recorded Stage 2 admissions file %s is missing; the export carries only their hash, "
                    "so Stage 3 cannot check test splits for overlap", source, file)
        return {"stage2_admissions_sha256": sha}
    read_admissions(file, sha)  # refuses an altered file
    out = Path(out)
    copy = out.with_name(out.name.removesuffix(out.suffix) + EXPORT_SUFFIX)
    shutil.copyfile(file, copy)
    return {"stage2_admissions": copy.name, "stage2_admissions_sha256": sha}


# ---- Stage 3's guard ---------------------------------------------------------------------------------------


def check_stage3_overlap(kind: str, weights: str | None, test_manifest: str | Path,
                         allow: bool = False) -> dict:
    """Compare a test manifest's MIMIC ids with the Stage 2 admissions behind ``weights``.

    Returns the results-row fields (``{}`` when the test split has no MIMIC ids or the backbone no Stage 2
    record): ``stage2_overlap_check`` (``checked`` | ``unchecked``), ``stage2_overlap_train`` (test rows whose
    admission Stage 2 trained on), ``stage2_overlap_val``, ``stage2_overlap_patients`` (test rows whose
    patient is in Stage 2's train or val split) and ``allow_overlap``. Training-admission overlap raises
    :class:`LeakageError` unless ``allow``."""
    test_manifest = Path(test_manifest)
    if not weights or not test_manifest.is_file():
        return {}
    test = manifest_ids(pd.read_csv(test_manifest))
    if not test:
        return {}
    try:
        found = stage2_admissions(weights)
    except LeakageError as err:
        if not allow:
            raise LeakageError(f"{err}; or pass --allow_overlap true to evaluate without the check") from None
        log.warning("%s; evaluating without the overlap check (--allow_overlap)", err)
        return {"stage2_overlap_check": "unchecked", "allow_overlap": True}
    if found is None:
        if kind == "pacx":
            log.warning("backbone %s carries no record of its Stage 2 admissions (not a pacx Stage 2 output, "
                        "or an older one): cannot check %s for overlap with them", weights, test_manifest)
            return {"stage2_overlap_check": "unchecked", "allow_overlap": allow}
        return {}
    ids, where = found
    counts = overlap_counts(test, ids)
    subjects = [ids[f"{s}_subject_id"] for s in STAGE2_SPLITS if f"{s}_subject_id" in ids]
    shared_patients = (int(np.isin(test["subject_id"], np.concatenate(subjects)).sum())
                       if subjects and "subject_id" in test else None)
    fields = {"stage2_overlap_check": "checked", "stage2_overlap_train": counts["admissions_train"],
              "stage2_overlap_val": counts["admissions_val"], "stage2_overlap_patients": shared_patients,
              "allow_overlap": allow}
    n, rows = counts["admissions_train"] or 0, len(next(iter(test.values())))
    if n:
        message = (f"{n} of {rows} test rows of {test_manifest} share an admission (hadm_id) with the "
                   f"Stage 2 training admissions of backbone {weights} ({where}): the encoder was "
                   "distilled on them")
        if not allow:
            raise LeakageError(f"{message}. Rebuild the manifests with --exclude-hadm <Symile "
                               "data_npy>/train/hadm_id_train.npy (docs/datasets.md#leakage), or pass "
                               "--allow_overlap true to evaluate anyway (the counts are recorded in "
                               "the results row)")
        log.warning("%s; evaluating anyway (--allow_overlap), recorded in the results row", message)
    for what, count in (("admissions of its Stage 2 validation split", counts["admissions_val"]),
                        ("patients with its Stage 2 train / val splits", shared_patients)):
        if count:
            log.warning("%d of %d test rows of %s share %s (backbone %s); recorded in the results row", count,
                        rows, test_manifest, what, weights)
    return fields

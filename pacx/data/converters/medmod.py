"""MedMod converters (phenotypes, mortality): pipeline outputs -> split manifests (docs/datasets.md#medmod).

Reads ``medmod_final.csv`` if the raw folder has it, else builds it from the MedMod pipeline's outputs and
MIMIC-CXR-JPG's metadata; ``cxr_path`` keeps its MIMIC-CXR-JPG relative path. Building needs ``exclude_hadm``
(Symile's training admissions) or an explicit ``allow_overlap``, recorded in the summary's ``leakage`` entry
(docs/datasets.md#leakage; docs/design.md#converters).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pacx.data.converters.base import Converter, ConverterOption
from pacx.data.converters.classification import (
    benchmark_converter,
    find_file,
    split_two_step,
    write_manifests,
)
from pacx.data.leakage import ids_sha256, load_id_file
from pacx.data.manifest import ManifestError, read_manifest
from pacx.data.registry import get_benchmark
from pacx.progress import progress

log = logging.getLogger(__name__)

MEDMOD_FINAL = "medmod_final.csv"
MEDMOD_STAYS = "all_stays.csv"
MEDMOD_PHENOTYPE_FILE = "phenotype_labels.csv"
MIMIC_CXR_METADATA = ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz")
MEDMOD_STRATIFY = "Other upper respiratory disease"
MEDMOD_DROP = ("last_careunit", "los", "race", "ethnicity", "gender", "age")
MEDMOD_META = ("subject_id", "hadm_id", "stay_id", "intime", "outtime", "admittime", "dischtime", "deathtime",
               "anchor_age", "dod")
MEDMOD_TIMES = ("intime", "outtime", "admittime", "dischtime")


class OverlapPolicyError(ValueError):
    """MedMod was asked for without a decision on the admissions Stage 2 trains on."""


def cxr_study_times(meta: pd.DataFrame) -> pd.Series:
    """MIMIC-CXR ``StudyDate`` (YYYYMMDD) + ``StudyTime`` (HHMMSS[.fff]) -> datetime (fraction dropped)."""
    date = meta["StudyDate"].astype("int64").astype(str)
    time = meta["StudyTime"].astype(float).astype("int64").astype(str).str.zfill(6)
    return pd.to_datetime(date + time, format="%Y%m%d%H%M%S")


def link_stays_to_cxr(stays: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
    """docs/datasets.md#medmod step 2: each stay (in table order) takes the earliest of its subject's
    still-unused images whose study time lies in [min(intime, admittime), max(outtime, dischtime)]; the image
    then leaves the pool. Stays without a match are dropped. Adds
    ``cxr_path = p<xx>/p<subject>/s<study>/<dicom>.jpg``."""
    meta = meta.assign(_t=cxr_study_times(meta)).sort_values("_t", kind="stable")
    pool: dict[int, list[tuple[pd.Timestamp, str, int]]] = {}
    columns = zip(meta["subject_id"], meta["dicom_id"], meta["study_id"], meta["_t"])
    for subject, dicom, study, t in progress(columns, total=len(meta), desc="medmod images", unit="img"):
        pool.setdefault(int(subject), []).append((t, str(dicom), int(study)))
    times = {c: pd.to_datetime(stays[c]) for c in MEDMOD_TIMES}
    start = pd.concat([times["intime"], times["admittime"]], axis=1).min(axis=1)
    stop = pd.concat([times["outtime"], times["dischtime"]], axis=1).max(axis=1)
    keep, paths = [], []
    subjects = progress(stays["subject_id"].astype("int64"), desc="medmod link", unit="stay")
    for i, subject in enumerate(subjects):
        images = pool.get(int(subject), [])
        for j, (t, dicom, study) in enumerate(images):  # sorted by time: the first hit is the earliest
            if start.iat[i] <= t <= stop.iat[i]:
                keep.append(i)
                paths.append(f"p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg")
                del images[j]
                break
    if len(keep) < len(stays):
        log.info("MedMod: %d of %d stays have no CXR in their admission window (dropped)",
                 len(stays) - len(keep), len(stays))
    return stays.iloc[keep].assign(cxr_path=paths).reset_index(drop=True)


def exclude_admissions(df: pd.DataFrame, exclude_hadm: str | Path) -> tuple[pd.DataFrame, dict]:
    """Rows of ``df`` whose ``hadm_id`` is not in the id file, and what was done (for the sidecar)."""
    excluded = load_id_file(exclude_hadm)
    drop = df["hadm_id"].astype("int64").isin(excluded)
    log.info("MedMod: dropped %d of %d stays whose admission is in %s (%d ids)", int(drop.sum()), len(df),
             exclude_hadm, len(excluded))
    return df[~drop], {"exclude_hadm": str(exclude_hadm),
                       "exclude_hadm_sha256": ids_sha256({"hadm_id": excluded}),
                       "excluded_ids": int(len(np.unique(excluded))), "stays_dropped": int(drop.sum())}


def build_medmod_final(raw: Path, exclude_hadm: str | Path | None = None) -> tuple[pd.DataFrame, dict]:
    """``all_stays.csv`` + row-aligned ``phenotype_labels.csv`` (minus the ``exclude_hadm`` admissions) linked
    to ``mimic-cxr-2.0.0-metadata.csv``; columns in the reference's ``medmod_final.csv`` order."""
    stays_path, pheno_path = find_file(raw, [MEDMOD_STAYS]), find_file(raw, [MEDMOD_PHENOTYPE_FILE])
    stays = read_manifest(stays_path, [*MEDMOD_META, *get_benchmark("medmod_mort").labels])
    phenotypes = read_manifest(pheno_path, get_benchmark("medmod_phys").labels)
    if len(stays) != len(phenotypes):
        raise ManifestError(f"{pheno_path}: {len(phenotypes)} rows, but {stays_path} has {len(stays)} "
                            "(the files must be row-aligned)")
    df = pd.concat([stays, phenotypes], axis=1).drop(columns=list(MEDMOD_DROP), errors="ignore")
    record: dict = {}
    if exclude_hadm:
        df, record = exclude_admissions(df, exclude_hadm)
    meta_path = find_file(raw, MIMIC_CXR_METADATA)
    meta = read_manifest(meta_path, ["dicom_id", "subject_id", "study_id", "StudyDate", "StudyTime"])
    linked = link_stays_to_cxr(df.reset_index(drop=True), meta)
    labels = [*get_benchmark("medmod_mort").labels, *get_benchmark("medmod_phys").labels]
    return linked[[*MEDMOD_META, *labels, "cxr_path"]], record


def overlap_policy(name: str, exclude_hadm: str | None, allow_overlap: bool) -> None:
    """Exactly one of the two: an error naming ``--exclude-hadm`` otherwise; ``allow_overlap`` is loud."""
    if exclude_hadm and allow_overlap:
        raise OverlapPolicyError(f"{name}: give either --exclude-hadm or --allow-overlap, not both")
    if not exclude_hadm and not allow_overlap:
        raise OverlapPolicyError(
            f"{name}: building MedMod needs --exclude-hadm <Symile data_npy>/train/hadm_id_train.npy (drops "
            "the admissions Stage 2 distils on, as the paper does), or --allow-overlap to keep them "
            "knowingly (docs/datasets.md#leakage)")
    if allow_overlap:
        log.warning("%s: --allow-overlap: MedMod keeps Symile-MIMIC's training admissions; a PaCX-MAE "
                    "encoder distilled on them is then tested on admissions it has seen (recorded in "
                    "prepare.json, and Stage 3 refuses such a backbone unless --allow_overlap true)",
                    name.upper())


def _prepare_medmod(name: str, raw: Path, out: Path, seed: int, exclude_hadm: str | None,
                    allow_overlap: bool) -> dict:
    overlap_policy(name, exclude_hadm, bool(allow_overlap))
    spec = get_benchmark(name)
    if (raw / MEDMOD_FINAL).is_file():
        path = raw / MEDMOD_FINAL
        df = read_manifest(path, ["stay_id", "subject_id", "hadm_id", spec.path_column, MEDMOD_STRATIFY,
                                  *spec.labels])
        record = {}
        if exclude_hadm:
            df, record = exclude_admissions(df, exclude_hadm)
            record["applied_to"] = f"{MEDMOD_FINAL} (after linking)"
    else:
        df, record = build_medmod_final(raw, exclude_hadm)
        out.mkdir(parents=True, exist_ok=True)
        df.to_csv(out / MEDMOD_FINAL, index=False)
    frames = split_two_step(df, 0.2, 0.1 / 0.8, int(seed), stratify=MEDMOD_STRATIFY)
    summary = write_manifests(spec, frames, out, patient_column="subject_id")
    summary["leakage"] = {"allow_overlap": bool(allow_overlap), **record}
    return summary


_EXCLUDE = ConverterOption(
    "--exclude-hadm", "Symile-MIMIC data_npy/train/hadm_id_train.npy: drop these admissions (the ones Stage "
                      "2 distils on) before linking stays to images; this or --allow-overlap is required",
    is_flag=False, default=None)
_ALLOW = ConverterOption(
    "--allow-overlap", "keep Symile's training admissions in MedMod (logged as a warning and recorded)")


CONVERTERS: list[Converter] = []  # this module's converters (pacx.data.prepare gathers them)


@benchmark_converter(CONVERTERS, "medmod_phys", _EXCLUDE, _ALLOW)
def prepare_medmod_phys(raw: Path, out: Path, seed: int = 42, exclude_hadm: str | None = None,
                        allow_overlap: bool = False) -> dict:
    """``medmod_final.csv`` if present, else built from the pipeline outputs and the MIMIC-CXR metadata;
    Symile training admissions excluded; stay-level 70/10/20 stratified on the rarest phenotype."""
    return _prepare_medmod("medmod_phys", raw, out, seed, exclude_hadm, allow_overlap)


@benchmark_converter(CONVERTERS, "medmod_mort", _EXCLUDE, _ALLOW)
def prepare_medmod_mort(raw: Path, out: Path, seed: int = 42, exclude_hadm: str | None = None,
                        allow_overlap: bool = False) -> dict:
    """The same split CSVs as ``medmod_phys``; the task reads the three mortality columns."""
    return _prepare_medmod("medmod_mort", raw, out, seed, exclude_hadm, allow_overlap)

"""Classification benchmarks: official release metadata -> split manifests (docs/datasets.md).

One converter per classification entry of ``pacx.data.registry.BENCHMARKS``, in this module's
``CONVERTERS`` (gathered by :mod:`pacx.data.prepare`). Each reproduces the reference's split recipe from
the release's metadata and never opens or moves images (the image roots: docs/design.md#converters). Its
helpers (``find_file``, ``split_two_step``, ``write_manifests``, ``benchmark_converter``) serve MedMod's too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from pacx.data.converters.base import Converter, ConverterOption, converter
from pacx.data.images import IMAGE_SUFFIXES
from pacx.data.manifest import ManifestError, read_manifest, row_ref
from pacx.data.registry import INDEX_COLUMN, SPLITS, BenchmarkSpec, get_benchmark
from pacx.progress import progress

log = logging.getLogger(__name__)

Frames = dict[str, pd.DataFrame]


# ---------------------------------------------------------------- shared helpers


def find_file(raw: Path, candidates: Sequence[str]) -> Path:
    """The first of ``candidates`` (paths relative to ``raw``) that exists, else a clear error."""
    for rel in candidates:
        if (raw / rel).is_file():
            return raw / rel
    raise FileNotFoundError(f"none of {list(candidates)} found under {raw}")


def find_dir(raw: Path, candidates: Sequence[str]) -> Path:
    for rel in candidates:
        if (raw / rel).is_dir():
            return raw / rel
    raise FileNotFoundError(f"none of the folders {list(candidates)} found under {raw}")


def split_rest(df: pd.DataFrame, test_size: float, seed: int, stratify: str | None = None):
    """sklearn ``train_test_split`` on rows, optionally stratified on one column: (rest, held-out)."""
    return train_test_split(df, test_size=test_size, random_state=seed,
                            stratify=df[stratify] if stratify else None)


def split_two_step(df: pd.DataFrame, test_size: float, val_size: float, seed: int,
                   stratify: str | None = None) -> Frames:
    """Test share of all rows, then val share of the remainder (both seeded, optionally stratified)."""
    rest, test = split_rest(df, test_size, seed, stratify)
    train, val = split_rest(rest, val_size, seed, stratify)
    return {"train": train, "val": val, "test": test}


def write_manifests(spec: BenchmarkSpec, frames: Frames, out: Path,
                    patient_column: str | None = None) -> dict:
    """Write one CSV per split under ``out`` and return the summary (rows, positives, patients)."""
    summary: dict = {"files": []}
    for split in SPLITS:
        df = frames[split].reset_index(drop=True)
        path = out / spec.manifest_files[split]
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)
        summary["files"].append(str(path))
        entry: dict = {"rows": len(df)}
        if spec.label_source == "index":
            counts = df[INDEX_COLUMN].value_counts()
            entry["positives"] = {name: int(counts.get(i, 0)) for i, name in enumerate(spec.labels)}
        else:
            entry["positives"] = {label: int((df[label] == 1).sum()) for label in spec.labels}
        if patient_column:
            entry["patients"] = int(df[patient_column].nunique())
        summary[split] = entry
    return summary


def require_columns(df: pd.DataFrame, columns: Sequence[str], source: Path | str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ManifestError(f"{source}: missing required column(s) {missing}; columns present: "
                            f"{list(df.columns)}")


def require_filled(df: pd.DataFrame, columns: Sequence[str], source: Path | str) -> None:
    """A blank cell in a column the converter reads is an error naming ``source``, the count and the first
    rows (with their lines in the file) and columns; never a row silently dropped or mislabelled."""
    blank = df[list(columns)].isna()
    rows = blank.any(axis=1)
    if rows.any():
        first = "; ".join(f"{row_ref(r)}: {[c for c in columns if blank.at[r, c]]}"
                          for r in rows[rows].index[:5])
        raise ManifestError(f"{source}: {int(blank.to_numpy().sum())} blank cell(s) in {int(rows.sum())} "
                            f"row(s) (first: {first})")


SEED_HELP = "split seed (default 42, the reference's)"
_SEED = ConverterOption("--seed", SEED_HELP, is_flag=False, default=42)


def benchmark_converter(table: list[Converter], name: str, *options: ConverterOption):
    """:func:`~pacx.data.converters.base.converter` for the benchmark ``name``: its task, metric and
    description come from its spec, and ``--seed`` precedes ``options``."""
    spec = get_benchmark(name)
    return converter(table, name, task=spec.task, metric=spec.metric, description=spec.description,
                     options=(_SEED, *options))


CONVERTERS: list[Converter] = []  # this module's converters (pacx.data.prepare gathers them)


def _register(name: str, *options: ConverterOption):
    return benchmark_converter(CONVERTERS, name, *options)


# ---------------------------------------------------------------- CheXchoNet (docs/datasets.md#chexchonet)

CHEXCHONET_METADATA = "metadata.csv"
CHEXCHONET_TARGET = "composite_slvh_dlv"


@_register("chexchonet")
def prepare_chexchonet(raw: Path, out: Path, seed: int = 42) -> dict:
    """Variant A: image-level split, test 20% then val 10% of the rest, stratified on the composite label."""
    spec = get_benchmark("chexchonet")
    path = find_file(raw, [CHEXCHONET_METADATA])
    df = read_manifest(path, [spec.path_column, *spec.labels])[[spec.path_column, *spec.labels]]
    require_filled(df, [spec.path_column, *spec.labels], path)
    frames = split_two_step(df, 0.2, 0.1, int(seed), stratify=CHEXCHONET_TARGET)
    return write_manifests(spec, frames, out)


@_register("chexchonet_echo")
def prepare_chexchonet_echo(raw: Path, out: Path, seed: int = 42) -> dict:
    """Variant B: patients (label = max composite over their images) split 80/20, the 20% halved into
    val/test, both stratified; manifests keep all metadata columns plus ``split``."""
    spec = get_benchmark("chexchonet_echo")
    path = find_file(raw, [CHEXCHONET_METADATA])
    df = read_manifest(path, ["patient_id", spec.path_column, CHEXCHONET_TARGET, *spec.labels])
    require_filled(df, ["patient_id", spec.path_column, CHEXCHONET_TARGET, *spec.labels], path)
    patients = df.groupby("patient_id", sort=True)[CHEXCHONET_TARGET].max().rename("y").reset_index()
    train_p, rest_p = split_rest(patients, 0.2, int(seed), "y")
    val_p, test_p = split_rest(rest_p, 0.5, int(seed), "y")
    frames = {}
    for split, ids in (("train", train_p), ("val", val_p), ("test", test_p)):
        frames[split] = df[df["patient_id"].isin(ids["patient_id"])].assign(split=split)
    return write_manifests(spec, frames, out, patient_column="patient_id")


# ---------------------------------------------------------------- VinDr-CXR (docs/datasets.md#vindr)

VINDR_TRAIN = ("annotations/image_labels_train.csv", "image_labels_train.csv")
VINDR_TEST = ("annotations/image_labels_test.csv", "image_labels_test.csv")


def vindr_majority_vote(df: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Per-radiologist rows -> one row per image: label mean over readers >= 0.5 (2 of 3) gives 1."""
    means = df.groupby("image_id", sort=True)[list(labels)].mean()
    return (means >= 0.5).astype(int).reset_index()


@_register("vindr", ConverterOption(
    "--min-positives", "warn when the spec's labels differ from those with at least this many train "
                       "positives (the reference's filter, default 50)", is_flag=False, default=50))
def prepare_vindr(raw: Path, out: Path, seed: int = 42, min_positives: int = 50) -> dict:
    """Majority vote over train readers, the spec's 19 labels, random 90/10 train/val; official test."""
    spec = get_benchmark("vindr")
    labels = list(spec.labels)
    train_path, test_path = find_file(raw, VINDR_TRAIN), find_file(raw, VINDR_TEST)
    train_raw = read_manifest(train_path, ["image_id", "rad_id", *labels])
    voted_cols = [c for c in train_raw.columns if c not in ("image_id", "rad_id", "No finding")]
    require_filled(train_raw, ["image_id", *voted_cols], train_path)
    voted = vindr_majority_vote(train_raw, voted_cols)
    counts = voted[voted_cols].sum()
    kept = set(counts[counts >= int(min_positives)].index)
    if kept != set(labels):
        log.warning("VinDr: labels with >= %d positives differ from the spec: extra %s, below threshold %s",
                    int(min_positives), sorted(kept - set(labels)), sorted(set(labels) - kept))
    voted = voted.assign(image_id=voted["image_id"].astype(str) + ".png")[["image_id", *labels]]
    train, val = split_rest(voted, 0.1, int(seed))
    test = pd.read_csv(test_path).rename(columns={"Other disease": "Other diseases"})
    require_columns(test, ["image_id", *labels], test_path)
    require_filled(test, ["image_id", *labels], test_path)
    test = test.assign(image_id=test["image_id"].astype(str) + ".png")[["image_id", *labels]]
    return write_manifests(spec, {"train": train, "val": val, "test": test}, out)


# ---------------------------------------------------------------- COVID-QU-Ex classification
# (docs/datasets.md#covidqu)

COVIDQU_LUNG = ("Lung Segmentation Data/Lung Segmentation Data", "Lung Segmentation Data")
COVIDQU_SPLITS = {"train": "Train", "val": "Val", "test": "Test"}
COVIDQU_FOLDERS = ("COVID-19", "Non-COVID", "Normal")


@_register("covidqu")
def prepare_covidqu(raw: Path, out: Path, seed: int = 42) -> dict:
    """Filenames listed from the official Train/Val/Test class folders; Normal 0, COVID-19 1, Non-COVID 2.

    The reference keys its table by filename, so a name seen twice keeps its last occurrence (splits in
    Train, Val, Test order, classes in folder order). ``seed`` is unused (official splits).
    """
    spec = get_benchmark("covidqu")
    base = find_dir(raw, COVIDQU_LUNG)
    rows: dict[str, tuple[int, str]] = {}
    for split, folder in progress(COVIDQU_SPLITS.items(), desc="covidqu", unit="split"):
        for category in COVIDQU_FOLDERS:
            img_dir = base / folder / category / "images"
            if not img_dir.is_dir():
                raise FileNotFoundError(f"COVID-QU-Ex: missing folder {img_dir}")
            for f in sorted(img_dir.glob("*.png")):
                rows.pop(f.name, None)
                rows[f.name] = (spec.labels.index(category), split)
    df = pd.DataFrame([(k, lab, s) for k, (lab, s) in rows.items()],
                      columns=[spec.path_column, INDEX_COLUMN, "Split"])
    return write_manifests(spec, {s: df[df["Split"] == s] for s in SPLITS}, out)


# ---------------------------------------------------------------- TB Shenzhen (docs/datasets.md#tb)

TB_METADATA = "shenzhen_metadata.csv"


@_register("tb")
def prepare_tb(raw: Path, out: Path, seed: int = 42) -> dict:
    """``findings == "normal"`` -> 0 else 1; stratified test 20%, then val 15% of the rest."""
    spec = get_benchmark("tb")
    path = find_file(raw, [TB_METADATA])
    meta = read_manifest(path, ["study_id", "findings"])
    require_filled(meta, ["study_id", "findings"], path)  # a blank finding is not "TB"
    df = pd.DataFrame({spec.path_column: meta["study_id"],
                       "Label": (meta["findings"] != "normal").astype(int)})
    return write_manifests(spec, split_two_step(df, 0.2, 0.15, int(seed), stratify="Label"), out)


# ---------------------------------------------------------------- ChestX6 (docs/datasets.md#chestx6)

CHESTX6_ROOT = ("chest-xray", ".")


@_register("chestx6")
def prepare_chestx6(raw: Path, out: Path, seed: int = 42) -> dict:
    """``Path = <split>/<class>/<file>`` + one-hot class columns; official splits, each shuffled."""
    spec = get_benchmark("chestx6")
    base = next((raw / c for c in CHESTX6_ROOT if (raw / c / "train").is_dir()), None)
    if base is None:
        raise FileNotFoundError(f"ChestX6: no train/ folder under {raw} or {raw / 'chest-xray'}")
    frames = {}
    for split in progress(SPLITS, desc="chestx6", unit="split"):
        rows = []
        for cls in spec.labels:
            folder = base / split / cls
            if not folder.is_dir():
                raise FileNotFoundError(f"ChestX6: missing folder {folder}")
            files = sorted(p for p in folder.iterdir() if p.is_file())
            images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
            others = [f.name for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
            if others:  # e.g. a .DS_Store from the archive: not an image row
                log.warning("ChestX6: %s: %d file(s) that are not images left out: %s", folder, len(others),
                            ", ".join(others[:5]))
            rows += [{spec.path_column: f"{split}/{cls}/{f.name}", **{c: int(c == cls) for c in spec.labels}}
                     for f in images]
        frames[split] = pd.DataFrame(rows, columns=[spec.path_column, *spec.labels]).sample(
            frac=1.0, random_state=int(seed))
    return write_manifests(spec, frames, out)


# ---------------------------------------------------------------- NIH ChestX-ray14 (docs/datasets.md#nih)

NIH_ENTRY = "Data_Entry_2017.csv"
NIH_TRAIN_VAL = "train_val_list.txt"
NIH_TEST = "test_list.txt"
NIH_NO_FINDING = "No Finding"


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@_register("nih")
def prepare_nih(raw: Path, out: Path, seed: int = 42) -> dict:
    """Multi-hot from ``Finding Labels``; official test list; random 85/15 of the train_val list."""
    spec = get_benchmark("nih")
    entry_path = find_file(raw, [NIH_ENTRY])
    entry = read_manifest(entry_path, [spec.path_column, "Finding Labels", "Patient ID"])
    require_filled(entry, [spec.path_column, "Finding Labels", "Patient ID"], entry_path)
    findings = entry["Finding Labels"].astype(str).str.split("|")
    known = {*spec.labels, NIH_NO_FINDING}
    odd = findings.map(lambda f: sorted(set(f) - known))
    bad = odd.map(bool)
    if bad.any():
        names = sorted({name for names in odd[bad] for name in names})
        first = "; ".join(f"{row_ref(r)}: {odd[r]}" for r in bad[bad].index[:5])
        raise ManifestError(f"{entry_path}: {int(bad.sum())} row(s) with finding(s) outside the 14 labels "
                            f"and {NIH_NO_FINDING!r}: {names} (first: {first})")
    hot = pd.DataFrame({label: findings.map(lambda f, lab=label: int(lab in f)) for label in spec.labels})
    df = pd.concat([entry[[spec.path_column, "Finding Labels", "Patient ID"]], hot], axis=1)
    train_val_path, test_path = find_file(raw, [NIH_TRAIN_VAL]), find_file(raw, [NIH_TEST])
    train_val, test_ids = set(_read_list(train_val_path)), set(_read_list(test_path))
    shared = train_val & test_ids
    if shared:
        raise ManifestError(f"{train_val_path} and {test_path} share {len(shared)} image(s), e.g. "
                            f"{sorted(shared)[:3]}; the official lists are disjoint")
    unknown = (train_val | test_ids) - set(df[spec.path_column])
    if unknown:
        raise ManifestError(f"{entry_path}: {len(unknown)} listed image(s) missing, e.g. "
                            f"{sorted(unknown)[:3]}")
    train, val = split_rest(df[df[spec.path_column].isin(train_val)], 0.15, int(seed))
    test = df[df[spec.path_column].isin(test_ids)]
    return write_manifests(spec, {"train": train, "val": val, "test": test}, out, patient_column="Patient ID")


# ---------------------------------------------------------------- COVIDx and pediatric pneumonia
# (docs/datasets.md#extra-benchmarks)

COVIDX_FILES = ("train.txt", "val.txt", "test.txt")
COVIDX_COLUMNS = ["Patient ID", "Path", "Label", "Data Source"]


@_register("covidx")
def prepare_covidx(raw: Path, out: Path, seed: int = 42) -> dict:
    """The three official lists pooled ("positive" -> 1), then stratified 80/20 and 90/10."""
    spec = get_benchmark("covidx")
    parts = []
    for name in COVIDX_FILES:
        path = find_file(raw, [name])
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != len(COVIDX_COLUMNS):
                raise ManifestError(f"{path}: line {number}: expected {len(COVIDX_COLUMNS)} space-separated "
                                    f"fields {COVIDX_COLUMNS}, found {len(fields)}: {line.strip()!r}")
            rows.append(fields)
        parts.append(pd.DataFrame(rows, columns=COVIDX_COLUMNS, dtype=str))
    df = pd.concat(parts, ignore_index=True)
    other = sorted(set(df["Label"]) - {"positive", "negative"})
    if other:  # the reference reads every label but "positive" as 0; say so rather than silently
        log.warning("COVIDx: %d row(s) with a label other than positive/negative read as 0: %s",
                    int(df["Label"].isin(other).sum()), other[:5])
    df["Label"] = (df["Label"] == "positive").astype(int)
    return write_manifests(spec, split_two_step(df, 0.2, 0.1, int(seed), stratify="Label"), out,
                           patient_column="Patient ID")


PNE_ROOT = ("chest_xray/chest_xray", "chest_xray", ".")
PNE_CLASSES = {"NORMAL": 0, "PNEUMONIA": 1}


@_register("pneumonia")
def prepare_pneumonia(raw: Path, out: Path, seed: int = 42) -> dict:
    """Filenames from the official class folders pooled (deduplicated by name, last kept), re-split
    stratified 80/20 then 90/10."""
    spec = get_benchmark("pneumonia")
    base = next((raw / c for c in PNE_ROOT if (raw / c / "train" / "NORMAL").is_dir()), None)
    if base is None:
        raise FileNotFoundError(f"pneumonia: no train/NORMAL folder under {raw} (or "
                                "chest_xray/[chest_xray/])")
    rows: dict[str, int] = {}
    for split in progress(SPLITS, desc="pneumonia", unit="split"):
        for cls, label in PNE_CLASSES.items():
            folder = base / split / cls
            if not folder.is_dir():
                raise FileNotFoundError(f"pneumonia: missing folder {folder}")
            for f in sorted(folder.glob("*.jpeg")):
                rows.pop(f.name, None)
                rows[f.name] = label
    df = pd.DataFrame(list(rows.items()), columns=[spec.path_column, spec.labels[0]])
    return write_manifests(spec, split_two_step(df, 0.2, 0.1, int(seed), stratify=spec.labels[0]), out)

"""Symile-MIMIC ``data_npy/`` files (docs/datasets.md#symile-files): the file table, constants, validation.

Every release file the loaders read is one row of ``FILES`` (name pattern, trailing shape, dtypes, splits,
item kinds, value checks); teachers describe their own feature files. :func:`validate_split` checks one split
for one item kind against it, in bounded memory, remembering scans per file; errors name the file and what was
expected. The layout as read here: docs/design.md#symile-layout.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pacx.constants import MIMIC_LEAD_ORDER
from pacx.utils import write_json_atomic

log = logging.getLogger(__name__)

# The 50 labs in array order: ascending item id, the sorted order of labs_means.json
# (docs/datasets.md#symile-files).
SYMILE_LABS: tuple[tuple[int, str], ...] = (
    (50802, "Base Excess"), (50804, "Calculated Total CO2"), (50813, "Lactate"), (50818, "pCO2"),
    (50820, "pH"), (50821, "pO2"), (50861, "Alanine Aminotransferase (ALT)"), (50862, "Albumin"),
    (50863, "Alkaline Phosphatase"), (50868, "Anion Gap"), (50878, "Asparate Aminotransferase (AST)"),
    (50882, "Bicarbonate"), (50885, "Bilirubin, Total"), (50893, "Calcium, Total"), (50902, "Chloride"),
    (50910, "Creatine Kinase (CK)"), (50912, "Creatinine"), (50931, "Glucose"),
    (50934, "H (hemolysis index)"), (50947, "I (icterus index)"), (50960, "Magnesium"), (50970, "Phosphate"),
    (50971, "Potassium"), (50983, "Sodium"), (51006, "Urea Nitrogen"), (51133, "Absolute Lymphocyte Count"),
    (51146, "Basophils"), (51200, "Eosinophils"), (51221, "Hematocrit"), (51222, "Hemoglobin"),
    (51237, "INR(PT)"), (51244, "Lymphocytes"), (51248, "MCH"), (51249, "MCHC"), (51250, "MCV"),
    (51254, "Monocytes"), (51256, "Neutrophils"), (51265, "Platelet Count"), (51274, "PT"), (51275, "PTT"),
    (51277, "RDW"), (51279, "Red Blood Cells"), (51301, "White Blood Cells"), (51678, "L (lipemia index)"),
    (52069, "Absolute Basophil Count"), (52073, "Absolute Eosinophil Count"),
    (52074, "Absolute Monocyte Count"), (52075, "Absolute Neutrophil Count"),
    (52135, "Immature Granulocytes"), (52172, "RDW-SD"),
)
N_LABS = len(SYMILE_LABS)
LABS_MEANS_FILE = "labs_means.json"
# Symile writes labs_means.json keys as "<itemid>_percentile" (its CSV column names).
LABS_MEANS_KEY = "{itemid}_percentile"

# Last-axis lead order of ecg_*.npy (MIMIC-IV-ECG record order): aVF comes before aVL.
SYMILE_ECG_LEADS = MIMIC_LEAD_ORDER  # the last axis of ecg_{split}.npy
ECG_SAMPLING_HZ = 500
ECG_SAMPLES = 5000  # 10 s

SPLITS = ("train", "val", "val_retrieval", "test", "test_uni")
CHUNK_BYTES = 64 << 20  # value scans read this much per step


class SymileFileError(ValueError):
    """A Symile-MIMIC file is unusable; the message names the file and what was expected."""


@dataclass(frozen=True)
class ValueCheck:
    """An element-wise test: ``bad(chunk)`` is True where a value breaks the rule ``what`` describes."""

    what: str
    bad: Callable[[np.ndarray], np.ndarray]


VALUE_CHECKS: dict[str, ValueCheck] = {
    "finite": ValueCheck("NaN or inf", lambda a: ~np.isfinite(a)),
    "binary": ValueCheck("a value other than 0 and 1", lambda a: (a != 0) & (a != 1)),
    "unit_interval": ValueCheck("a value outside [0, 1]", lambda a: ~((a >= 0) & (a <= 1))),
}

_FLOATS = ("float32", "float64")
_INTS = ("int64", "int32")
_ALL = None  # FileSpec.items: needed by every item kind (small per-row metadata)


@dataclass(frozen=True)
class FileSpec:
    """One release file. ``shape`` is the trailing shape after N; a string entry matches any size."""

    key: str
    pattern: str  # "{split}" is replaced by the split name
    shape: tuple[int | str, ...]
    dtypes: tuple[str, ...]
    splits: frozenset[str]
    items: frozenset[str] | None  # item kinds that need the file; None = every item kind
    checks: tuple[str, ...] = ("finite",)
    renamed: tuple[tuple[str, str], ...] = ()  # (split, file name) where the release breaks the pattern

    def filename(self, split: str) -> str:
        return dict(self.renamed).get(split, self.pattern.format(split=split))

    def shape_str(self) -> str:
        return "[" + ", ".join(["N", *map(str, self.shape)]) + "]"


_ROWS = frozenset({"train", "val", "val_retrieval", "test"})
_RETRIEVAL = frozenset({"val_retrieval", "test"})
# Splits that hold teacher features (docs/datasets.md#teacher-features: none for val_retrieval).
FEATURE_SPLITS: tuple[str, ...] = ("train", "val", "test", "test_uni")

# The single table of release files. The first row present in a split is the reference for N.
FILES: tuple[FileSpec, ...] = (
    FileSpec("hadm_id", "hadm_id_{split}.npy", (), _INTS, _ROWS | {"test_uni"}, _ALL, (),
             renamed=(("test_uni", "hadm_id_test.npy"),)),
    FileSpec("cxr", "cxr_{split}.npy", (3, "H", "W"), ("float32",), _ROWS | {"test_uni"},
             frozenset({"cxr", "cxr_teachers", "cxr_raw_teachers"})),
    # the raw teacher inputs (pacx.teachers: ECGFounder reads ecg, the labs DAE the two labs files)
    FileSpec("ecg", "ecg_{split}.npy", (1, ECG_SAMPLES, len(SYMILE_ECG_LEADS)), ("float32",), _ROWS,
             frozenset({"ecg"})),
    FileSpec("labs_percentiles", "labs_percentiles_{split}.npy", (N_LABS,), _FLOATS, _ROWS,
             frozenset({"labs", "labs_raw"}), ("finite", "unit_interval")),
    FileSpec("labs_missingness", "labs_missingness_{split}.npy", (N_LABS,),
             _INTS + ("uint8", "bool") + _FLOATS, _ROWS, frozenset({"labs", "labs_raw"}), ("binary",)),
    FileSpec("label", "label_{split}.npy", (), _INTS, _RETRIEVAL, _ALL, ("binary",)),
    FileSpec("label_hadm_id", "label_hadm_id_{split}.npy", (), _INTS, _RETRIEVAL, _ALL, ()),
)


def files_for(split: str, item: str | None, extra: Sequence[FileSpec] = ()) -> list[FileSpec]:
    """The rows of ``FILES`` that ``item`` reads in ``split`` (``None``: only those every item reads), then
    the ``extra`` files (a teacher's inputs or features); errors if the split lacks one it needs."""
    if split not in SPLITS:
        raise KeyError(f"unknown Symile-MIMIC split {split!r}; known: {list(SPLITS)}")
    kinds = set().union(*(spec.items for spec in FILES if spec.items is not None))
    if item is not None and item not in kinds:
        raise KeyError(f"unknown Symile-MIMIC item kind {item!r}; known: {sorted(kinds)}")
    needed = [s for s in FILES if s.items is not None and item in s.items]
    for spec in (*needed, *extra):
        if split not in spec.splits:
            what = f"item kind {item!r}" if spec in needed else "a teacher"
            raise SymileFileError(
                f"{what} needs {spec.filename(split)}, which split {split!r} "
                f"does not have (it exists for {sorted(spec.splits)})"
            )
    out = [s for s in FILES if split in s.splits and (s.items is None or s in needed)]
    for spec in extra:  # two teachers may read the same input file: validate it once
        if spec.key not in {s.key for s in out}:
            out.append(spec)
    return out


# ------------------------------------------------------------------------------------------ value scans


def first_bad_row(
    arr: np.ndarray, checks: tuple[str, ...], chunk_bytes: int = CHUNK_BYTES
) -> tuple[int, str] | None:
    """(row, what) of the first row breaking any check, scanning ``chunk_bytes`` of rows at a time."""
    if not checks or len(arr) == 0:
        return None
    row_bytes = max(1, arr[:1].nbytes)
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, len(arr), step):
        chunk = np.asarray(arr[start:start + step])
        hits = []
        for name in checks:
            bad = VALUE_CHECKS[name].bad(chunk).reshape(len(chunk), -1).any(axis=1)  # [rows]
            if bad.any():
                hits.append((int(np.argmax(bad)), VALUE_CHECKS[name].what))
        if hits:
            row, what = min(hits)
            return start + row, what
    return None


class ValidationCache:
    """Files whose values passed their checks, keyed by resolved path with size and mtime.

    Held in-process for every instance, and also in ``path`` (JSON) when given, so later runs skip
    the scan too. A file that changes (size or mtime) is scanned again.
    """

    _memory: dict[str, dict] = {}
    _lock = threading.Lock()

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._disk: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            try:
                self._disk = json.loads(self.path.read_text())
            except (OSError, ValueError) as err:
                log.warning("ignoring unreadable validation cache %s: %s", self.path, err)

    @staticmethod
    def _stamp(path: Path) -> tuple[str, dict]:
        st = path.stat()
        return str(path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def passed(self, path: Path, checks: tuple[str, ...]) -> bool:
        key, stamp = self._stamp(path)
        for store in (self._memory, self._disk):
            entry = store.get(key)
            fresh = entry is not None and all(entry.get(k) == v for k, v in stamp.items())
            if fresh and set(checks) <= set(entry["checks"]):
                with self._lock:
                    self._memory[key] = entry
                return True
        return False

    def record(self, path: Path, checks: tuple[str, ...]) -> None:
        key, stamp = self._stamp(path)
        entry = {**stamp, "checks": sorted(checks)}
        with self._lock:
            self._memory[key] = entry
            self._disk[key] = entry
        if self.path is not None:
            write_json_atomic(self.path, self._disk)

    @classmethod
    def forget_all(cls) -> None:
        """Drop the in-process memory (tests; a changed file is rescanned anyway)."""
        with cls._lock:
            cls._memory.clear()


# ------------------------------------------------------------------------------------------ validation


def open_npy(path: Path) -> np.ndarray:
    """Memory-map one ``.npy`` file; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"missing Symile-MIMIC file: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SymileFileError(f"{path}: not a readable .npy array: {err}") from err


def check_layout(path: Path, arr: np.ndarray, spec: FileSpec) -> None:
    """Trailing shape and dtype of one file against its table row."""
    ok = arr.ndim == 1 + len(spec.shape) and all(
        isinstance(want, str) or got == want for got, want in zip(arr.shape[1:], spec.shape)
    )
    if not ok:
        raise SymileFileError(f"{path}: expected shape {spec.shape_str()}, got {list(arr.shape)}")
    if arr.dtype.name not in spec.dtypes:
        raise SymileFileError(
            f"{path}: dtype {arr.dtype.name} not allowed; expected one of {list(spec.dtypes)}"
        )


def validate_split(
    root: str | Path,
    split: str,
    item: str | None,
    check_values: bool = True,
    cache: ValidationCache | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    extra: Sequence[FileSpec] = (),
) -> dict[str, Path]:
    """Check the files ``item`` reads in ``<root>/<split>/`` and the ``extra`` ones (teacher inputs or feature
    files, :func:`files_for`); returns ``{file key: path}``.

    Raises ``FileNotFoundError`` for a missing file and ``SymileFileError`` for a wrong shape, dtype, row
    count or value, or a split without rows, each naming the file (and for counts both files, for values the
    first bad row).
    """
    split_dir = Path(root) / split
    cache = cache if cache is not None else ValidationCache()
    paths: dict[str, Path] = {}
    ref: tuple[Path, int] | None = None
    for spec in files_for(split, item, extra):
        path = split_dir / spec.filename(split)
        arr = open_npy(path)
        check_layout(path, arr, spec)
        if ref is None:
            ref = (path, len(arr))
        elif len(arr) != ref[1]:
            raise SymileFileError(f"row counts differ: {path} has N={len(arr)} but {ref[0]} has N={ref[1]}")
        if check_values and spec.checks and not cache.passed(path, spec.checks):
            bad = first_bad_row(arr, spec.checks, chunk_bytes)
            if bad is not None:
                raise SymileFileError(f"{path}: row {bad[0]} has {bad[1]} (checks: {list(spec.checks)})")
            cache.record(path, spec.checks)
        paths[spec.key] = path
        del arr
    if ref is not None and ref[1] == 0:
        raise SymileFileError(f"{ref[0]}: no rows (N=0); an empty split cannot be trained or evaluated on")
    log.info("Symile-MIMIC %s: %d rows, files %s verified for item %r", split, ref[1] if ref else 0,
             sorted(p.name for p in paths.values()), item)
    return paths

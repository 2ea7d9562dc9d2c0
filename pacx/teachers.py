"""Teacher feature extraction for Stage 2: ``ecg_features.npy`` and ``labs_features.npy`` per split.

Runs the frozen teachers (docs/method.md#teachers) over a Symile-MIMIC ``data_npy`` tree and writes, next
to each split's release files, the arrays Stage 2 distils from (docs/datasets.md#teacher-features):

- ``<root>/<split>/ecg_features.npy`` float32 [N, 1024]: ECGFounder on :func:`preprocess_ecg` of each
  stored record, the time-averaged last stage;
- ``<root>/<split>/labs_features.npy`` float32 [N, 256]: the labs DAE encoder on the **uncorrupted**
  raw percentiles (mean-imputed placeholders *not* zeroed, ``zero_missing=False``) and the
  missingness flags, as the reference does.

As the reference: eval mode, no gradients (``torch.inference_mode``), batch 64, rows in file order.
Features are made for train, val and test only (not val_retrieval). ``test_uni`` (docs/datasets.md#teacher-features) is derived,
not recomputed: its rows are the first ``n`` test rows, which must be exactly the test positives
(``label == 1``) with ``label_hadm_id`` equal to ``test_uni``'s ``hadm_id_test.npy``; this is checked.

Memory: the ECG array is 2.4 GB on train. It is never held whole, and it is not kept mapped either:
each batch maps the file, copies its rows and unmaps again (:func:`read_rows`). A mapping kept open
for the whole pass would count every page it has touched as resident memory of this process (measured:
peak RSS grows to the file size), so the release-wide value scan of ``validate_split`` is skipped for
the ECG file and each batch is checked for NaN/inf as it is read instead.

Crash safety: each output is filled through ``open_memmap`` under a hidden temporary name in the same
directory and renamed onto the final name only when complete (after an ``fsync``), so an interrupted
run never leaves a truncated file at the final name. A split whose output already exists with the
right shape [N, D] and dtype is skipped unless ``overwrite``. ``scripts/extract_teacher_features.py``
is the command-line entry point; ``scripts/benchmark_teachers.py`` measures throughput and peak RSS.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pacx.constants import ECG_EMBED_DIM, LABS_EMBED_DIM
from pacx.data.symile_files import FILES, SymileFileError, ValidationCache, open_npy, validate_split
from pacx.models.ecgfounder import ECGFounder, load_ecgfounder, preprocess_ecg
from pacx.models.labs_dae import LabsDAE, load_labs_dae
from pacx.progress import progress as progress_bar
from pacx.run_record import process_alive

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64  # docs/datasets.md#teacher-features: batch 64, no shuffling
DERIVED_SPLIT, DERIVED_FROM = "test_uni", "test"  # test_uni = the leading (positive) rows of test
FEATURE_KEYS = ("ecg_features", "labs_features")
_SPECS = {spec.key: spec for spec in FILES}
# Splits that hold teacher features, from the file table (train, val, test, test_uni).
FEATURE_SPLITS: tuple[str, ...] = tuple(
    s for s in ("train", "val", "test", DERIVED_SPLIT) if s in _SPECS["ecg_features"].splits
)


# ------------------------------------------------------------------------------------------ reading


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a ``.npy`` file as an in-memory copy, through a short-lived memory map.

    The map is dropped before returning, so the pages read do not stay resident in this process
    (they remain in the OS page cache, which is not the process's memory).
    """
    arr = open_npy(path)
    try:
        return np.array(arr[start:stop])
    finally:
        del arr  # unmaps: nothing else references the mapping


def _n_rows(path: Path) -> int:
    arr = open_npy(path)
    n = len(arr)
    del arr
    return n


# ------------------------------------------------------------------------------------------ teachers


class Teacher:
    """One frozen network and the release files it reads.

    ``key`` is the output's row in the file table (``ecg_features`` / ``labs_features``), ``item`` the
    ``SymileDataset`` item kind whose files are its input (validated through ``validate_split``), and
    ``features(paths, start, stop)`` returns float32 [stop - start, embed_dim] for those rows.
    ``timings`` accumulates seconds per phase (read / preprocess / network) for benchmarks.
    """

    key: str
    item: str
    check_values: bool  # scan the input files' values up front (cheap for small files only)

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.embed_dim: int = model.embed_dim
        self.timings: dict[str, float] = {}
        self.reset_timings()

    def reset_timings(self) -> None:
        self.timings = {"read_s": 0.0, "preprocess_s": 0.0, "network_s": 0.0}

    def _run(self, *inputs: np.ndarray) -> np.ndarray:
        """The network on numpy inputs -> float32 numpy [B, D]; no autograd state is recorded."""
        start = time.perf_counter()
        with torch.inference_mode():
            tensors = [torch.from_numpy(x).to(self.device) for x in inputs]
            out = self.encode(*tensors).float().cpu().numpy()  # the copy to CPU syncs the device
        self.timings["network_s"] += time.perf_counter() - start
        return out

    def encode(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Input tensors on the teacher's device -> features [B, D] (the frozen network alone)."""
        raise NotImplementedError

    def features(self, paths: dict[str, Path], start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{type(self.model).__name__} -> {self.key} [N, {self.embed_dim}] on {self.device}"


class ECGTeacher(Teacher):
    """ECGFounder on ``ecg_<split>.npy`` ([N, 1, 5000, 12], Symile lead order), preprocessed per batch."""

    key, item, check_values = "ecg_features", "ecg", False  # values are checked batch by batch

    def __init__(self, model: ECGFounder, device: str | torch.device = "cpu") -> None:
        super().__init__(model, device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # [B, 12, T] -> [B, D]

    def features(self, paths: dict[str, Path], start: int, stop: int) -> np.ndarray:
        t0 = time.perf_counter()
        raw = read_rows(paths["ecg"], start, stop)  # [B, 1, 5000, 12]
        bad = ~np.isfinite(raw).reshape(len(raw), -1).all(axis=1)
        if bad.any():  # preprocess_ecg would silently zero these, so stop here instead
            raise SymileFileError(f"{paths['ecg']}: row {start + int(np.argmax(bad))} has NaN or inf")
        t1 = time.perf_counter()
        x = preprocess_ecg(raw)  # [B, 12, 5000] float32, ECGFounder lead order, filtered, z-scored
        t2 = time.perf_counter()
        self.timings["read_s"] += t1 - t0
        self.timings["preprocess_s"] += t2 - t1
        return self._run(x)


class LabsTeacher(Teacher):
    """Labs DAE encoder on the raw percentiles (placeholders kept) and the 0/1 observed flags."""

    key, item, check_values = "labs_features", "labs_raw", True

    def __init__(self, model: LabsDAE, device: str | torch.device = "cpu") -> None:
        super().__init__(model, device)

    def encode(self, percentiles: torch.Tensor, missingness: torch.Tensor) -> torch.Tensor:
        return self.model.encode(percentiles, missingness, zero_missing=False)  # [B, 256]

    def features(self, paths: dict[str, Path], start: int, stop: int) -> np.ndarray:
        t0 = time.perf_counter()
        pct = read_rows(paths["labs_percentiles"], start, stop).astype(np.float32)  # [B, 50]
        miss = read_rows(paths["labs_missingness"], start, stop).astype(np.float32)  # [B, 50], int64 on disk
        self.timings["read_s"] += time.perf_counter() - t0
        return self._run(pct, miss)


def load_teachers(
    ecgfounder: str | Path | None = None,
    labs_dae: str | Path | None = None,
    ecgfounder_config: str = "12_lead",
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
) -> list[Teacher]:
    """The teachers whose weights are given (either may be omitted, not both), loaded strictly."""
    teachers: list[Teacher] = []
    if ecgfounder is not None:
        teachers.append(ECGTeacher(load_ecgfounder(ecgfounder, ecgfounder_config, trust_pickle=trust_pickle),
                                   device))
    if labs_dae is not None:
        teachers.append(LabsTeacher(load_labs_dae(labs_dae), device))
    if not teachers:
        raise ValueError("no teacher given: pass an ECGFounder weights file, a labs DAE, or both")
    return teachers


# ------------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class FeatureFile:
    """What happened to one output file: ``status`` is ``written`` or ``skipped``."""

    split: str
    key: str
    path: Path
    shape: tuple[int, int]
    status: str
    seconds: float = 0.0


def feature_path(root: str | Path, split: str, key: str) -> Path:
    """``<root>/<split>/<file name>`` of output ``key``, named by the file table."""
    return Path(root) / split / _SPECS[key].filename(split)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_temps(path: Path) -> None:
    """Delete temporary files of ``path`` left by killed runs (their process no longer exists)."""
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            log.info("removing %s, left by an interrupted run (process %s)", tmp, pid)
            tmp.unlink(missing_ok=True)


def existing_matches(path: Path, shape: tuple[int, int]) -> bool:
    """Whether ``path`` already holds a float32 array of ``shape`` (a wrong one is logged)."""
    if not path.is_file():
        return False
    try:
        arr = open_npy(path)
        got = (tuple(arr.shape), arr.dtype.name)
        del arr
    except SymileFileError as err:
        log.warning("%s is unreadable and will be rewritten: %s", path, err)
        return False
    if got != (shape, "float32"):
        log.warning("%s holds %s %s, expected float32 %s: it will be rewritten", path, got[1], list(got[0]),
                    list(shape))
        return False
    return True


def write_features_atomic(
    path: Path,
    n: int,
    dim: int,
    batch_fn: Callable[[int, int], np.ndarray],
    batch_size: int,
    desc: str = "",
    progress: bool = True,
) -> None:
    """Fill float32 [n, dim] at ``path`` from ``batch_fn(start, stop)``, batch by batch, atomically.

    Rows are written into a memory-mapped temporary file next to ``path``; the file is flushed, synced
    and renamed onto ``path`` only when every row is in. Any exception (including KeyboardInterrupt)
    removes the temporary file and leaves ``path`` as it was.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    remove_stale_temps(path)
    tmp = _temp_path(path)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        for start in progress_bar(range(0, n, batch_size), desc=desc, unit="batch", enabled=progress):
            stop = min(start + batch_size, n)
            feats = batch_fn(start, stop)  # [stop - start, dim]
            if feats.shape != (stop - start, dim):
                raise RuntimeError(f"{desc}: rows {start}:{stop} gave features of shape {list(feats.shape)}, "
                                   f"expected {[stop - start, dim]}")
            if not np.isfinite(feats).all():
                raise FloatingPointError(f"{desc}: non-finite features in rows {start}:{stop}")
            out[start:stop] = feats
        out.flush()
        del out
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ splits


# widths the release teachers (ECGFounder, Labs DAE) give; other teachers (the demo's) give their own
RELEASE_FEATURE_DIMS = {"ecg_features": ECG_EMBED_DIM, "labs_features": LABS_EMBED_DIM}


def _check_dim(teacher: Teacher) -> None:
    want = RELEASE_FEATURE_DIMS[teacher.key]
    if teacher.embed_dim != want:
        log.info("%s will be [N, %d] (the release teachers give [N, %d]); set Stage 2's model dims to match",
                 teacher.key, teacher.embed_dim, want)


def extract_split(
    root: str | Path,
    split: str,
    teachers: Sequence[Teacher],
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    cache: ValidationCache | None = None,
) -> list[FeatureFile]:
    """Run every teacher over one split (train, val or test) and write its features file.

    The inputs are validated first (``validate_split``: files present, layouts, one N, value checks for
    the small labs arrays); an output already holding float32 [N, D] is skipped unless ``overwrite``.
    """
    if split == DERIVED_SPLIT or split not in FEATURE_SPLITS:
        raise ValueError(f"teacher features are computed for {[s for s in FEATURE_SPLITS if s != DERIVED_SPLIT]} "
                         f"(and derived for {DERIVED_SPLIT}), not {split!r} (docs/datasets.md#teacher-features)")
    results = []
    for teacher in teachers:
        paths = validate_split(root, split, teacher.item, check_values=teacher.check_values, cache=cache)
        n = _n_rows(paths["hadm_id"])
        out = feature_path(root, split, teacher.key)
        shape = (n, teacher.embed_dim)
        if not overwrite and existing_matches(out, shape):
            log.info("%s: %s exists with shape %s, skipped (pass overwrite to recompute)", split, out.name,
                     list(shape))
            results.append(FeatureFile(split, teacher.key, out, shape, "skipped"))
            continue
        start = time.perf_counter()
        write_features_atomic(out, n, teacher.embed_dim, lambda a, b, t=teacher, p=paths: t.features(p, a, b),
                              batch_size, desc=f"{split} {teacher.key}", progress=progress)
        seconds = time.perf_counter() - start
        log.info("%s: wrote %s %s in %.1f s (%.1f rows/s)", split, out, list(shape), seconds, n / max(seconds, 1e-9))
        results.append(FeatureFile(split, teacher.key, out, shape, "written", seconds))
    return results


def leading_positive_rows(root: str | Path) -> int:
    """Number of ``test_uni`` rows, after checking they are the leading positive rows of ``test``.

    The reference builds ``test_uni`` from the test rows with ``label == 1``; in the release those are
    exactly the first ``n`` rows (all positives first) and ``test_uni``'s ``hadm_id_test.npy`` holds their
    ``label_hadm_id``. Both facts are checked so a mismatch cannot pass silently.
    """
    root = Path(root)
    hadm = np.asarray(open_npy(root / DERIVED_SPLIT / _SPECS["hadm_id"].filename(DERIVED_SPLIT)))
    label_path = root / DERIVED_FROM / _SPECS["label"].filename(DERIVED_FROM)
    label_hadm_path = root / DERIVED_FROM / _SPECS["label_hadm_id"].filename(DERIVED_FROM)
    label, label_hadm = np.asarray(open_npy(label_path)), np.asarray(open_npy(label_hadm_path))
    n = len(hadm)
    positives = np.flatnonzero(label == 1)
    if not np.array_equal(positives, np.arange(n)):
        raise SymileFileError(
            f"{label_path}: test_uni has {n} rows, so the test positives (label == 1) must be exactly rows "
            f"0..{n - 1}; found {len(positives)} positives, first non-leading at row "
            f"{next((int(i) for k, i in enumerate(positives) if i != k), n)}"
        )
    if not np.array_equal(label_hadm[:n], hadm):
        row = int(np.argmax(label_hadm[:n] != hadm))
        raise SymileFileError(f"{root / DERIVED_SPLIT}: hadm_id row {row} is {hadm[row]}, but {label_hadm_path} "
                              f"row {row} is {label_hadm[row]} (test_uni holds the test queries' label_hadm_id)")
    return n


def derive_test_uni(
    root: str | Path,
    teachers: Sequence[Teacher],
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    rewritten: Iterable[str] = (),
    progress: bool = True,
) -> list[FeatureFile]:
    """``test_uni`` features: the first ``leading_positive_rows(root)`` rows of test's feature files.

    Copied (not recomputed) from ``<root>/test/<key>``, which must exist with [N_test, D]. Skipped when
    the output already has the right shape, unless ``overwrite`` or test's file is in ``rewritten``.
    """
    n = leading_positive_rows(root)
    n_test = _n_rows(Path(root) / DERIVED_FROM / _SPECS["label"].filename(DERIVED_FROM))
    rewritten = set(rewritten)
    results = []
    for teacher in teachers:
        src = feature_path(root, DERIVED_FROM, teacher.key)
        if not existing_matches(src, (n_test, teacher.embed_dim)):
            raise SymileFileError(f"{src}: needed as float32 [{n_test}, {teacher.embed_dim}] to derive "
                                  f"{DERIVED_SPLIT}; extract the test split first")
        out = feature_path(root, DERIVED_SPLIT, teacher.key)
        shape = (n, teacher.embed_dim)
        if not overwrite and teacher.key not in rewritten and existing_matches(out, shape):
            log.info("%s: %s exists with shape %s, skipped", DERIVED_SPLIT, out.name, list(shape))
            results.append(FeatureFile(DERIVED_SPLIT, teacher.key, out, shape, "skipped"))
            continue
        start = time.perf_counter()
        write_features_atomic(out, n, teacher.embed_dim, lambda a, b, s=src: read_rows(s, a, b), batch_size,
                              desc=f"{DERIVED_SPLIT} {teacher.key}", progress=progress)
        log.info("%s: wrote %s %s (the first %d rows of %s)", DERIVED_SPLIT, out, list(shape), n, src)
        results.append(FeatureFile(DERIVED_SPLIT, teacher.key, out, shape, "written",
                                   time.perf_counter() - start))
    return results


def default_splits(root: str | Path) -> list[str]:
    """train, val, test, and test_uni when ``<root>/test_uni`` exists."""
    base = [s for s in FEATURE_SPLITS if s != DERIVED_SPLIT]
    return base + ([DERIVED_SPLIT] if (Path(root) / DERIVED_SPLIT).is_dir() else [])


def extract_teacher_features(
    root: str | Path,
    teachers: Sequence[Teacher],
    splits: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    progress: bool = True,
) -> list[FeatureFile]:
    """Write every teacher's features for ``splits`` (default :func:`default_splits`) under ``root``.

    ``test_uni`` is handled after ``test`` whatever the order given, and is re-derived whenever test's
    file was rewritten in this call.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Symile-MIMIC root is not a directory: {root}")
    if not teachers:
        raise ValueError("no teachers to run")
    splits = list(default_splits(root) if splits is None else splits)
    unknown = [s for s in splits if s not in FEATURE_SPLITS]
    if unknown:
        raise ValueError(f"no teacher features for split(s) {unknown}; they exist for {list(FEATURE_SPLITS)} "
                         "(docs/datasets.md#teacher-features: none for val_retrieval)")
    missing = [s for s in splits if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"split folder(s) {[str(root / s) for s in missing]} do not exist")
    for teacher in teachers:
        _check_dim(teacher)
        log.info("teacher: %s", teacher.describe())
    ordered = sorted(dict.fromkeys(splits), key=lambda s: s == DERIVED_SPLIT)  # test_uni last
    cache = ValidationCache()
    results: list[FeatureFile] = []
    for split in ordered:
        if split == DERIVED_SPLIT:
            rewritten = [r.key for r in results if r.split == DERIVED_FROM and r.status == "written"]
            results += derive_test_uni(root, teachers, batch_size, overwrite, rewritten, progress)
        else:
            results += extract_split(root, split, teachers, batch_size, overwrite, progress, cache)
    return results

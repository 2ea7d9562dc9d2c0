"""Teacher feature extraction for Stage 2: ``<teacher>_features.npy`` per split, for any registered teacher.

Runs frozen teachers (:data:`pacx.teachers.TEACHERS`) over a Symile-MIMIC ``data_npy`` tree and writes the
arrays Stage 2 distils from next to each split's files (docs/datasets.md#teacher-features): as the reference,
eval mode, no gradients, batch 64, rows in file order. ``scripts/extract_teacher_features.py`` is the
command line; splits, ``test_uni`` checks and memory: docs/design.md#teacher-extraction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from pacx.data.symile_files import (
    FEATURE_SPLITS,
    FILES,
    SymileFileError,
    ValidationCache,
    open_npy,
    validate_split,
)
from pacx.teachers import BadRow, TeacherSpec, teacher_spec
from pacx.teachers.files import FeatureFile, existing_matches, n_rows, read_rows, write_features_atomic

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64  # docs/datasets.md#teacher-features: batch 64, no shuffling
DERIVED_SPLIT, DERIVED_FROM = "test_uni", "test"  # test_uni = the leading (positive) rows of test
_SPECS = {spec.key: spec for spec in FILES}


# ------------------------------------------------------------------------------------------ teachers


class Teacher:
    """One registered teacher (``spec``) with its frozen network, on ``device``.

    ``features(paths, start, stop)`` reads rows ``start:stop`` of each of the spec's input files (``paths``:
    file key -> path, as ``validate_split`` returns them), preprocesses them and returns float32
    [stop - start, embed_dim]. ``key`` is the output's file key (``ecg_features``); ``embed_dim`` the
    network's feature width (its ``embed_dim`` attribute, else the spec's width). ``timings`` accumulates
    seconds per phase (read / preprocess / network) for benchmarks.
    """

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.embed_dim = int(getattr(model, "embed_dim", spec.width))
        self.timings: dict[str, float] = {}
        self.reset_timings()

    @property
    def key(self) -> str:
        return self.spec.feature_key

    def reset_timings(self) -> None:
        self.timings = {"read_s": 0.0, "preprocess_s": 0.0, "network_s": 0.0}

    def encode(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Input tensors on the teacher's device -> features [B, D] (the frozen network alone)."""
        return self.spec.encode(self.model, *tensors)

    def _run(self, *inputs: np.ndarray) -> np.ndarray:
        """The network on numpy inputs -> float32 numpy [B, D]; no autograd state is recorded."""
        start = time.perf_counter()
        with torch.inference_mode():
            tensors = [torch.from_numpy(x).to(self.device) for x in inputs]
            out = self.encode(*tensors).float().cpu().numpy()  # the copy to CPU syncs the device
        self.timings["network_s"] += time.perf_counter() - start
        return out

    def features(self, paths: Mapping[str, Path], start: int, stop: int) -> np.ndarray:
        t0 = time.perf_counter()
        raw = [read_rows(paths[f.key], start, stop) for f in self.spec.inputs]  # as stored, [B, ...] each
        t1 = time.perf_counter()
        try:
            inputs = self.spec.preprocess(*raw)
        except BadRow as err:  # name the file and the row of the split
            raise SymileFileError(f"{paths[err.key]}: row {start + err.row} has {err.what}") from err
        t2 = time.perf_counter()
        self.timings["read_s"] += t1 - t0
        self.timings["preprocess_s"] += t2 - t1
        return self._run(*inputs)

    def describe(self) -> str:
        return (f"{self.spec.name}: {type(self.model).__name__} -> {self.key} [N, {self.embed_dim}] "
                f"on {self.device}")


def load_teachers(
    weights: Mapping[str, str | Path],
    options: Mapping[str, Mapping] | None = None,
    device: str | torch.device = "cpu",
) -> list[Teacher]:
    """One :class:`Teacher` per entry of ``weights`` (teacher name -> weights file), in that order, each
    network loaded strictly by its spec's ``load(weights, **options[name])`` (e.g.
    ``{"ecg": {"config": "demo_small", "trust_pickle": False}}``)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(weights))
    if unknown:
        raise ValueError(f"teacher options for {unknown}, which have no weights (given: {sorted(weights)})")
    if not weights:
        raise ValueError("no teacher given: pass the weights of at least one teacher")
    teachers = []
    for name, path in weights.items():
        spec = teacher_spec(name)
        teachers.append(Teacher(spec, spec.load(path, **options.get(name, {})), device))
    return teachers


def feature_path(root: str | Path, split: str, teacher: str) -> Path:
    """``<root>/<split>/<feature file>`` of a registered teacher (``ecg`` -> ``ecg_features.npy``)."""
    return Path(root) / split / teacher_spec(teacher).feature_file


# ------------------------------------------------------------------------------------------ splits


def _check_dim(teacher: Teacher) -> None:
    if teacher.embed_dim != teacher.spec.width:
        log.info("%s will be [N, %d] (the reference %s teacher gives [N, %d]); set Stage 2's "
                 "model.init_args.teacher_dims to match", teacher.key, teacher.embed_dim, teacher.spec.name,
                 teacher.spec.width)


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
        raise ValueError("teacher features are computed for "
                         f"{[s for s in FEATURE_SPLITS if s != DERIVED_SPLIT]} (and derived for "
                         f"{DERIVED_SPLIT}), not {split!r} (docs/datasets.md#teacher-features)")
    results = []
    for teacher in teachers:
        paths = validate_split(root, split, None, check_values=teacher.spec.check_inputs, cache=cache,
                               extra=teacher.spec.inputs)
        n = n_rows(paths["hadm_id"])
        out = feature_path(root, split, teacher.spec.name)
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
        log.info("%s: wrote %s %s in %.1f s (%.1f rows/s)", split, out, list(shape), seconds,
                 n / max(seconds, 1e-9))
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
        raise SymileFileError(f"{root / DERIVED_SPLIT}: hadm_id row {row} is {hadm[row]}, but "
                              f"{label_hadm_path} row {row} is {label_hadm[row]} (test_uni holds the test "
                              "queries' label_hadm_id)")
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
    n_test = n_rows(Path(root) / DERIVED_FROM / _SPECS["label"].filename(DERIVED_FROM))
    rewritten = set(rewritten)
    results = []
    for teacher in teachers:
        src = feature_path(root, DERIVED_FROM, teacher.spec.name)
        if not existing_matches(src, (n_test, teacher.embed_dim)):
            raise SymileFileError(f"{src}: needed as float32 [{n_test}, {teacher.embed_dim}] to derive "
                                  f"{DERIVED_SPLIT}; extract the test split first")
        out = feature_path(root, DERIVED_SPLIT, teacher.spec.name)
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

"""The frozen teachers of Stage 2, by name (docs/method.md#teachers; docs/method.md#adding-a-teacher).

``TEACHERS`` maps a lowercase name to a :class:`TeacherSpec`: feature file, width, the raw Symile-MIMIC files
it reads, and ``load`` / ``preprocess`` / ``encode``. Everything that handles teachers reads the spec
(docs/design.md#teacher-registry). It holds the release teachers ``ecg`` (ECGFounder, 1024-d) and ``labs``
(the labs denoising autoencoder, 256-d); another teacher is one :func:`register_teacher` call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pacx.constants import ECG_EMBED_DIM, LABS_EMBED_DIM
from pacx.data.symile_files import FEATURE_SPLITS, FILES, FileSpec
from pacx.models.ecgfounder import load_ecgfounder, preprocess_ecg
from pacx.models.labs_dae import load_labs_dae

_RELEASE_FILES = {spec.key: spec for spec in FILES}
RESERVED_NAMES = ("cxr",)  # the CXR side of the heads and batches


class BadRow(ValueError):
    """A raw input row a teacher refuses (``preprocess``): ``row`` indexes the batch, ``key`` names the input
    file; extraction reports the file and the row of the split instead."""

    def __init__(self, key: str, row: int, what: str) -> None:
        super().__init__(f"{key} batch row {row} has {what}")
        self.key, self.row, self.what = key, row, what


def check_finite(key: str, rows: np.ndarray) -> None:
    """Raise :class:`BadRow` for the first row of ``rows`` [B, ...] holding NaN or inf."""
    bad = ~np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
    if bad.any():
        raise BadRow(key, int(np.argmax(bad)), "NaN or inf")


@dataclass(frozen=True)
class TeacherSpec:
    """One frozen teacher.

    Args:
        name: lowercase key in configs (``teachers: [ecg, labs]``), heads, batches and metric names.
        width: the feature width of the reference network (Stage 2's default head width for this teacher).
        inputs: the raw files it reads, one row of each per sample (``FileSpec``s; release files come from
            ``pacx.data.symile_files.FILES``).
        load: ``load(weights, **options) -> nn.Module``, the network in eval mode, loaded strictly. The
            network exposes ``embed_dim`` (its feature width) where it can differ from ``width``.
        preprocess: ``preprocess(*raw) -> tuple of numpy arrays``: the raw rows (one array per input, as
            stored) -> the network's inputs; raises :class:`BadRow` for a row it refuses.
        encode: ``encode(network, *inputs) -> [B, D]``, the inputs as tensors on the network's device.
        title: display name in tables (default ``name``).
        feature_file: the per-split feature file (default ``<name>_features.npy``).
        check_inputs: scan the inputs' values once per split before extraction (``validate_split``); off
            where the files are large and ``preprocess`` checks each batch instead (the ECGs, 2.4 GB).
    """

    name: str
    width: int
    inputs: tuple[FileSpec, ...]
    load: Callable[..., nn.Module]
    preprocess: Callable[..., tuple[np.ndarray, ...]]
    encode: Callable[..., torch.Tensor]
    title: str = ""
    feature_file: str = ""
    check_inputs: bool = True
    feature_spec: FileSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower() or self.name in RESERVED_NAMES:
            raise ValueError(f"teacher name {self.name!r}: a lowercase identifier other than "
                             f"{RESERVED_NAMES}")
        if self.width < 1 or not self.inputs:
            raise ValueError(f"teacher {self.name!r}: needs a positive width and at least one input file")
        object.__setattr__(self, "title", self.title or self.name)
        object.__setattr__(self, "feature_file", self.feature_file or f"{self.name}_features.npy")
        # the feature file as a row of the file table: float32 [N, D] in the feature splits, D any width
        object.__setattr__(self, "feature_spec",
                           FileSpec(self.feature_key, self.feature_file, (f"{self.name}_dim",),
                                    ("float32",), frozenset(FEATURE_SPLITS), frozenset()))

    @property
    def feature_key(self) -> str:
        """The feature file's key among a split's files (``ecg_features``)."""
        return f"{self.name}_features"


# ------------------------------------------------------------------------------------------ release teachers


def _load_ecgfounder(weights, config: str = "12_lead", trust_pickle: bool = False) -> nn.Module:
    return load_ecgfounder(weights, config, trust_pickle=trust_pickle)


def _preprocess_ecg(ecg: np.ndarray) -> tuple[np.ndarray]:
    """Raw Symile ECGs [B, 1, 5000, 12] -> ECGFounder input [B, 12, 5000] float32 (lead order, filters,
    z-score). A non-finite row is refused: ``preprocess_ecg`` would silently zero it."""
    check_finite("ecg", ecg)
    return (preprocess_ecg(ecg),)


def _encode_ecg(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return network(x)  # [B, 12, T] -> [B, D], the time-averaged last stage


def _preprocess_labs(percentiles: np.ndarray, missingness: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[B, 50] percentiles and [B, 50] observed flags (int64 on disk) -> float32 both."""
    return percentiles.astype(np.float32), missingness.astype(np.float32)


def _encode_labs(network: nn.Module, percentiles: torch.Tensor, missingness: torch.Tensor) -> torch.Tensor:
    # the uncorrupted raw percentiles: the mean-imputed placeholders are not zeroed
    # (docs/datasets.md#teacher-features)
    return network.encode(percentiles, missingness, zero_missing=False)  # [B, D]


ECG = TeacherSpec(
    "ecg", ECG_EMBED_DIM, (_RELEASE_FILES["ecg"],), _load_ecgfounder, _preprocess_ecg, _encode_ecg,
    title="ECG", check_inputs=False,  # 2.4 GB on train: each batch is checked as it is read instead
)
LABS = TeacherSpec(
    "labs", LABS_EMBED_DIM, (_RELEASE_FILES["labs_percentiles"], _RELEASE_FILES["labs_missingness"]),
    load_labs_dae, _preprocess_labs, _encode_labs,
)

TEACHERS: dict[str, TeacherSpec] = {spec.name: spec for spec in (ECG, LABS)}
DEFAULT_TEACHERS: tuple[str, ...] = ("ecg", "labs")  # the paper's


def register_teacher(spec: TeacherSpec) -> TeacherSpec:
    """Add a teacher to ``TEACHERS``; a name is registered once."""
    if spec.name in TEACHERS:
        raise KeyError(f"teacher {spec.name!r} registered twice")
    TEACHERS[spec.name] = spec
    return spec


def teacher_spec(name: str) -> TeacherSpec:
    if name not in TEACHERS:
        raise KeyError(f"unknown teacher {name!r}; registered: {sorted(TEACHERS)} "
                       "(pacx.teachers.register_teacher)")
    return TEACHERS[name]


def resolve_teachers(teachers: Iterable[str] | None = None, ablate: str | None = None) -> tuple[str, ...]:
    """The teacher names a Stage 2 configuration distils from: ``teachers`` (default ``DEFAULT_TEACHERS``),
    each registered, at least one, no repeats.

    ``ablate`` is the key older configs used (docs/method.md#stage-2): ``ablate: ecg`` removes ``ecg`` from
    the teachers (``teachers: [labs]`` with the defaults), so an old ablation config still works stacked on a
    config that names the teachers.
    """
    if isinstance(teachers, str):  # a bare string would iterate by characters ("unknown teacher 'l'")
        raise ValueError(f"teachers must be a list of names, e.g. [{teachers!r}], got the string "
                         f"{teachers!r}")
    names = tuple(DEFAULT_TEACHERS if teachers is None else teachers)
    if ablate is not None:
        if ablate not in DEFAULT_TEACHERS:
            raise ValueError(f"ablate must be one of {DEFAULT_TEACHERS} or None, got {ablate!r}")
        names = tuple(t for t in names if t != ablate)
    for name in names:
        teacher_spec(name)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"teachers must name at least one teacher, each once, got {list(names)}")
    return names


from pacx.teachers.extract import (  # noqa: E402  (the extraction reads the specs above)
    DEFAULT_BATCH_SIZE,
    DERIVED_SPLIT,
    FeatureFile,
    Teacher,
    extract_split,
    extract_teacher_features,
    feature_path,
    load_teachers,
    read_rows,
)

__all__ = [
    "DEFAULT_BATCH_SIZE", "DEFAULT_TEACHERS", "DERIVED_SPLIT", "FEATURE_SPLITS", "TEACHERS", "BadRow",
    "FeatureFile",
    "Teacher", "TeacherSpec", "check_finite", "extract_split", "extract_teacher_features", "feature_path",
    "load_teachers", "read_rows", "register_teacher", "resolve_teachers", "teacher_spec",
]

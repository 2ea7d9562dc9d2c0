"""Low-data training subsets (docs/datasets.md#low-data, the reference's ``LowDataCXRDataModule`` subsampler).

Not sklearn stratification: the subset holds at least one positive per label that has one, drawn step by step
as the reference does, but with local generators (the global RNG state is untouched). For a single integer
``Label`` column, pass ``indicator_columns(df, "Label", K)`` to guarantee one row per class. The algorithm and
our reading of the protocol: docs/design.md#low-data.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def subset_size(n_rows: int, n_labels: int, fraction: float) -> int:
    """``int(N * fraction)``, or ``n_labels + 1`` when that is smaller than the number of labels (capped at
    N)."""
    n = int(n_rows * fraction)
    if n < n_labels:
        n = n_labels + 1
    return min(n, n_rows)


def low_data_subset(df: pd.DataFrame, label_columns: Sequence[str], fraction: float,
                    seed: int) -> pd.DataFrame:
    """A seeded subset of ``df`` of ``subset_size(len(df), len(label_columns), fraction)`` rows with
    at least one positive (value 1) per label column that has one; see the module docstring."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    label_columns = list(label_columns)
    missing = [c for c in label_columns if c not in df.columns]
    if missing:
        raise KeyError(f"low-data subset: label column(s) {missing} not in the table; columns: "
                       f"{list(df.columns)}")
    py_rng = random.Random(seed)
    np_rng = np.random.RandomState(seed)
    n_rows = len(df)
    n = subset_size(n_rows, len(label_columns), fraction)
    picked: set[int] = set()
    for column in label_columns:
        positives = np.flatnonzero(df[column].to_numpy() == 1).tolist()
        if not positives:
            log.warning("low-data subset: label %r has no positive row; no positive guaranteed", column)
            continue
        picked.add(py_rng.choice(positives))
    n_fill = n - len(picked)
    if n_fill > 0:
        candidates = sorted(set(range(n_rows)) - picked)
        picked.update(int(i) for i in np_rng.choice(candidates, size=n_fill, replace=False))
    log.info("low-data subset: %d of %d rows (fraction %g, seed %d)", len(picked), n_rows, fraction, seed)
    return df.iloc[sorted(picked)].reset_index(drop=True)


def indicator_columns(df: pd.DataFrame, label_column: str,
                      num_classes: int) -> tuple[pd.DataFrame, list[str]]:
    """``df`` plus one 0/1 column per class of the integer ``label_column``, and those columns' names.

    The names are ``<label_column>==<k>`` for k in 0..num_classes-1; a value outside that range errors.
    """
    if label_column not in df.columns:
        raise KeyError(f"label column {label_column!r} not in the table; columns: {list(df.columns)}")
    labels = pd.to_numeric(df[label_column], errors="coerce")
    bad = labels.isna() | (labels < 0) | (labels >= num_classes) | (labels % 1 != 0)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        value = df[label_column].tolist()[row]  # a plain Python value for the message
        raise ValueError(f"row {row}: {label_column}={value!r} is not a class in 0..{num_classes - 1}")
    names = [f"{label_column}=={k}" for k in range(num_classes)]
    indicators = pd.DataFrame({name: (labels == k).astype(np.int64).to_numpy()
                               for k, name in enumerate(names)}, index=df.index)
    return pd.concat([df, indicators], axis=1), names

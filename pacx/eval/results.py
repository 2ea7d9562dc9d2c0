"""Stage 3 results CSVs (one row per ``test`` run, :meth:`pacx.lit.common.BenchmarkEvalModule.results_row`):
loaded and checked (:func:`load_results`; a re-run test supersedes its earlier row), re-scored in another
logged metric (:func:`use_metric`) and aggregated over seeds (:func:`aggregate`: mean, sample std, n;
docs/method.md#stage-3). :mod:`pacx.eval.tables` lays the aggregates out as tables.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("benchmark", "task", "metric", "backbone_kind", "seed", "metric_value", "run_dir")
# Columns a row may lack: segmentation rows carry no train fraction, older CSVs may lack the rest.
OPTIONAL_COLUMNS = ("mode", "train_fraction", "subset_seed", "backbone_weights", "git_sha")
STRING_COLUMNS = ("benchmark", "task", "metric", "backbone_kind", "mode", "backbone_weights", "git_sha",
                  "run_dir")
INT_COLUMNS = ("seed", "subset_seed")
# One test run = one row; a re-run of the same test appends another row that supersedes the earlier one.
RUN_KEY = ("run_dir", "benchmark", "backbone_kind", "mode", "train_fraction", "seed")
GROUP_KEY = ("benchmark", "backbone_kind", "mode", "train_fraction")
# What makes two runs the same test: rows that share it from different run directories count twice in a group.
TEST_KEY = ("benchmark", "backbone_kind", "backbone_weights", "mode", "train_fraction", "subset_seed", "seed")

# Settings that change the evaluation protocol without a column of GROUP_KEY (docs/method.md#stage-3): rows
# that differ in one are pooled into one table cell, which the load warns about. (``feature_cache`` is not
# one: the flip cache and the per-epoch path train the same head; the ``plain`` cache shows as ``train_flip``
# False.)
PROTOCOL_COLUMNS = ("pool", "train_flip")

# Tasks evaluated in one mode only (pacx/lit/segment.py ``eval_mode``: frozen backbone + decoder). Their rows
# fill a missing mode with it and appear in the table of every mode.
SINGLE_MODE_TASKS: dict[str, str] = {"segmentation": "frozen"}
UNKNOWN_MODE = "unknown"


def _read_one(path: Path) -> pd.DataFrame:
    """One results CSV with its columns checked and typed."""
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty results file") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: results CSV lacks required column(s) {missing}; has {list(df.columns)}")
    for column in OPTIONAL_COLUMNS:
        if column not in df.columns:
            df[column] = pd.NA
    tests = (c for c in df.columns if c.startswith("test/"))
    numeric = ["metric_value", "train_fraction", *INT_COLUMNS, *tests]
    for column in numeric:
        try:
            df[column] = pd.to_numeric(df[column])
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: column {column!r} is not numeric ({err})") from None
    for column in INT_COLUMNS:
        try:
            df[column] = df[column].astype("Int64")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: column {column!r} must hold integer seeds ({err})") from None
    df["source_csv"] = str(path)
    return df


def load_results(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate results CSVs, check and coerce their columns, and keep the last row of each run.

    A missing train fraction (segmentation rows) is 1.0; a missing mode is the task's only mode
    (:data:`SINGLE_MODE_TASKS`) or ``"unknown"``. Rows are superseded when a later row (later in the file,
    or in a later file) has the same :data:`RUN_KEY` — a re-run ``test`` appends a second row; the count is
    logged. Rows of the same test (:data:`TEST_KEY`) from different run directories are kept and warned
    about, naming them: each counts as a seed. Rows without a ``metric_value`` are dropped with a warning.

    Raises:
        ValueError: no paths, an empty file, a missing required column or a non-numeric value (the message
            names the file and the column), or no rows at all.
    """
    paths = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("no results CSV given")
    df = pd.concat([_read_one(p) for p in paths], ignore_index=True)
    if df.empty:
        raise ValueError(f"no results rows in {[str(p) for p in paths]}")
    for column in INT_COLUMNS:
        df[column] = df[column].astype("Int64")
    df["train_fraction"] = df["train_fraction"].astype(float).fillna(1.0)
    df["mode"] = df["mode"].fillna(df["task"].map(SINGLE_MODE_TASKS)).fillna(UNKNOWN_MODE)
    for column in STRING_COLUMNS:
        df[column] = df[column].astype("string")

    before = len(df)
    df = df.drop_duplicates(subset=list(RUN_KEY), keep="last")
    if len(df) < before:
        log.warning("%d results row(s) superseded by a later row of the same run (re-run test)",
                    before - len(df))
    repeated = df[df.duplicated(subset=list(TEST_KEY), keep=False)]
    if not repeated.empty:
        first = repeated.groupby(list(TEST_KEY), dropna=False, sort=False)["run_dir"].apply(list).iloc[0]
        log.warning("%d results row(s) repeat the same test (benchmark, backbone and its weights, mode, "
                    "train fraction, subset seed and seed) from different run directories; each counts as a "
                    "seed in the tables, which inflates n and shrinks the std (first: %s)", len(repeated),
                    ", ".join(map(str, first)))
    _warn_mixed_protocols(df)
    unscored = df["metric_value"].isna()
    if unscored.any():
        log.warning("dropping %d row(s) without a metric_value: %s", int(unscored.sum()),
                    sorted(set(df.loc[unscored, "benchmark"])))
        df = df[~unscored]
    return df.reset_index(drop=True)


def _warn_mixed_protocols(df: pd.DataFrame) -> None:
    """Warn, naming the cells, when rows of one table cell (:data:`GROUP_KEY`) differ in a
    :data:`PROTOCOL_COLUMNS` setting (blank cells, from rows that predate the column, are not compared)."""
    columns = [c for c in PROTOCOL_COLUMNS if c in df.columns]
    if not columns:
        return
    mixed = []
    for key, group in df.groupby(list(GROUP_KEY), dropna=False, sort=False):
        values = {c: sorted(map(str, group[c].dropna().unique())) for c in columns}
        differ = {c: v for c, v in values.items() if len(v) > 1}
        if differ:
            mixed.append(" ".join(f"{k:g}" if isinstance(k, float) else str(k) for k in key) + " ("
                         + ", ".join(f"{c} {v}" for c, v in differ.items()) + ")")
    if mixed:
        log.warning("%d table cell(s) pool results rows run under different protocol settings; each such "
                    "cell averages both (%s)", len(mixed), "; ".join(mixed[:5]))


def use_metric(df: pd.DataFrame, benchmark: str, column: str) -> pd.DataFrame:
    """Tabulate ``benchmark`` by another logged test metric: ``column`` (e.g. ``test/auroc`` or
    ``test/auroc_macro``) replaces its ``metric_value`` and names its ``metric`` (``auroc``). A row already in
    that metric keeps its ``metric_value`` where the column is blank. Error naming the column when no row has
    it, and naming the rows (their run directories) when some rows have no value in either: dropping them
    would average fewer runs than the table's n counts."""
    rows = df["benchmark"] == benchmark
    if column not in df.columns or df.loc[rows, column].isna().all():
        raise ValueError(f"no {benchmark} row has a value in column {column!r}")
    metric = column.split("/", 1)[-1].removesuffix("_macro")  # test/auroc_macro -> auroc
    values = df.loc[rows, column].astype(float)
    values = values.fillna(df.loc[rows, "metric_value"].where(df.loc[rows, "metric"] == metric))
    if values.isna().any():
        names = df["run_dir"] if "run_dir" in df.columns else df.index.to_series()
        blank = names[values.index[values.isna()]].astype(str).tolist()
        raise ValueError(f"{len(blank)} {benchmark} row(s) of {int(rows.sum())} have no value in column "
                         f"{column!r} (first: {', '.join(blank[:5])})")
    df = df.copy()
    df.loc[rows, "metric_value"] = values
    df["metric"] = df["metric"].astype(object)
    df.loc[rows, "metric"] = metric
    df["metric"] = df["metric"].astype("string")
    return df


def aggregate(df: pd.DataFrame, percent: bool = False) -> pd.DataFrame:
    """Mean, sample std (ddof=1) and n of ``metric_value`` per benchmark × backbone × mode × train
    fraction.

    With a single seed the std is 0 (n = 1 says so). ``percent`` scales mean and std by 100. Columns:
    :data:`GROUP_KEY` + ``task, metric, mean, std, n, n_upstream``; ``n_upstream`` counts the distinct
    upstream encoders (``backbone_weights``, e.g. one per Stage 2 seed) behind the n rows (1 when none).

    Raises:
        ValueError: one benchmark reports different metrics (results from different registry versions).
    """
    metrics = df.groupby("benchmark")["metric"].unique()
    mixed = {b: sorted(m) for b, m in metrics.items() if len(m) > 1}
    if mixed:
        raise ValueError(f"benchmarks with more than one paper metric in the results: {mixed}")
    scale = 100.0 if percent else 1.0
    if "backbone_weights" not in df:
        df = df.assign(backbone_weights=None)
    grouped = df.groupby(list(GROUP_KEY), dropna=False, sort=False)
    out = grouped.agg(task=("task", "first"), metric=("metric", "first"),
                      mean=("metric_value", "mean"), std=("metric_value", "std"), n=("metric_value", "size"),
                      n_upstream=("backbone_weights", lambda w: max(1, w.nunique(dropna=True))))
    out = out.reset_index()
    out["std"] = out["std"].fillna(0.0)
    out["mean"] *= scale
    out["std"] *= scale
    out["n"] = out["n"].astype(int)
    out["n_upstream"] = out["n_upstream"].astype(int)
    return out

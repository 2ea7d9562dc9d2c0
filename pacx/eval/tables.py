"""Aggregated Stage 3 results (:mod:`pacx.eval.results`) -> the paper's tables and the low-data figure.

Lays out the main table (:func:`main_table`) and the low-data table (:func:`low_data_table`,
docs/datasets.md#low-data), renders them as Markdown, LaTeX (booktabs) or JSON, and draws the low-data figure
(:func:`low_data_figure`). Rows follow the benchmark registry order, unknown benchmarks after, by name; all
metrics in use (AUROC, F1, IoU, Dice) are higher-is-better.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # Agg canvas; no pyplot state

from pacx.data.registry import BENCHMARKS
from pacx.eval.results import SINGLE_MODE_TASKS, aggregate

log = logging.getLogger(__name__)

BACKBONE_NAMES: dict[str, str] = {
    "random": "Random init",
    "imagenet": "ImageNet",
    "mae": "MAE",
    "pacx": "PaCX-MAE",
    "weights": "Weights",
}
METRIC_NAMES: dict[str, str] = {"auroc": "AUROC", "f1": "F1", "iou": "IoU", "dice": "Dice",
                                "accuracy": "Acc."}
DECIMALS: dict[bool, int] = {False: 3, True: 1}  # percent mode -> decimals shown
MISSING = "–"
PLUS_MINUS = "±"

# LaTeX: special characters of the cell texts, plus the two Unicode signs the cells use.
LATEX_ESCAPES: dict[int, str] = str.maketrans({
    "\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", PLUS_MINUS: r"$\pm$", MISSING: "--",
})


def benchmark_order(names: Iterable[str]) -> list[str]:
    """``names`` in registry order; names the registry lacks follow, sorted."""
    rank = {name: i for i, name in enumerate(BENCHMARKS)}
    return sorted(set(names), key=lambda n: (rank.get(n, len(rank)), n))


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """One aggregated cell: the paper metric's mean ± sample std over n runs from n_upstream encoders."""

    metric: str
    mean: float
    std: float
    n: int
    n_upstream: int = 1


@dataclass(frozen=True)
class Cell:
    """A rendered cell: plain text (Unicode ± and –) and whether it is the row's best."""

    text: str
    bold: bool = False


@dataclass(frozen=True)
class Table:
    """A laid-out table, independent of the output format.

    ``stats`` maps benchmark -> column key -> :class:`Stat` (key = backbone kind in the main table,
    ``"<kind>@<fraction>"`` in the low-data table); ``align`` has one LaTeX alignment letter per column.
    """

    header: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    align: str
    stats: Mapping[str, Mapping[str, Stat]] = field(default_factory=dict)


def backbone_name(kind: str) -> str:
    """Display name of a backbone kind (:data:`BACKBONE_NAMES`; unknown kinds as they are)."""
    return BACKBONE_NAMES.get(kind, kind)


def backbone_order(kinds: Iterable[str]) -> list[str]:
    """The distinct ``kinds`` in :data:`BACKBONE_NAMES` order; unknown kinds follow, sorted."""
    known = list(BACKBONE_NAMES)
    return sorted(set(kinds), key=lambda k: (known.index(k) if k in known else len(known), k))


def metric_name(metric: str) -> str:
    """Display name of a metric key (:data:`METRIC_NAMES`; unknown keys as they are)."""
    return METRIC_NAMES.get(metric, metric)


def fraction_label(fraction: float) -> str:
    """``0.01 -> "1 %"``, ``0.1 -> "10 %"``, ``1.0 -> "100 %"``."""
    return f"{fraction * 100:g} %"


def _select(df: pd.DataFrame, mode: str, backbones: Sequence[str]) -> pd.DataFrame:
    """Rows of ``mode`` (plus single-mode tasks such as segmentation) and of the requested backbones."""
    in_mode = (df["mode"] == mode) | df["task"].isin(list(SINGLE_MODE_TASKS))
    return df[in_mode & df["backbone_kind"].isin(list(backbones))]


def _stat_rows(agg: pd.DataFrame) -> dict[tuple[str, str, float], Stat]:
    return {(r.benchmark, r.backbone_kind, float(r.train_fraction)):
            Stat(r.metric, float(r.mean), float(r.std), int(r.n), int(r.n_upstream))
            for r in agg.itertuples(index=False)}


def _cells(stats: Sequence[Stat | None], decimals: int, n_full: int) -> list[Cell]:
    """Format one group of comparable cells; the best displayed mean is bold when two or more are present.

    A cell from fewer seeds than the table's fullest cell, or from a single seed, shows ``(n=k)``.
    """
    present = [round(s.mean, decimals) for s in stats if s is not None]
    best = max(present) if len(present) > 1 else math.inf
    cells = []
    for s in stats:
        if s is None:
            cells.append(Cell(MISSING))
            continue
        text = f"{s.mean:.{decimals}f} {PLUS_MINUS} {s.std:.{decimals}f}"
        if s.n == 1 or s.n < n_full:
            text += f" (n={s.n})"
        cells.append(Cell(text, bold=round(s.mean, decimals) == best))
    return cells


def main_table(
    df: pd.DataFrame, mode: str = "linear_probe", fraction: float = 1.0,
    backbones: Sequence[str] = ("imagenet", "mae", "pacx"), percent: bool = False,
) -> Table:
    """The paper's main table: one row per benchmark present (registry order), one column per backbone.

    ``df`` is :func:`load_results` output. Cells are ``mean ± std`` of the paper metric over seeds at
    ``fraction`` of the training data (3 decimals, or 1 in percent); the best mean of a row is bold;
    a missing backbone is ``–``. Segmentation rows (frozen only) appear whatever the ``mode``.
    """
    picked = _select(df, mode, backbones)
    picked = picked[np.isclose(picked["train_fraction"], fraction)]
    stats = _stat_rows(aggregate(picked, percent))
    decimals = DECIMALS[percent]
    n_full = max((s.n for s in stats.values()), default=0)
    rows, table_stats = [], {}
    for bench in benchmark_order(picked["benchmark"]):
        row_stats = [stats.get((bench, kind, float(fraction))) for kind in backbones]
        metric = next(s.metric for s in row_stats if s is not None)
        rows.append((Cell(bench), Cell(metric_name(metric)), *_cells(row_stats, decimals, n_full)))
        table_stats[bench] = {kind: s for kind, s in zip(backbones, row_stats) if s is not None}
    header = ("Benchmark", "Metric", *(backbone_name(k) for k in backbones))
    return Table(header, tuple(rows), "ll" + "c" * len(backbones), table_stats)


def low_data_table(
    df: pd.DataFrame, mode: str = "linear_probe", backbones: Sequence[str] = ("imagenet", "mae", "pacx"),
    percent: bool = False,
) -> Table:
    """Low-data table (docs/datasets.md#low-data): benchmarks with any run below 100 % of the training data,
    one column per backbone × train fraction (backbone outer). The best mean per fraction is bold."""
    picked = _select(df, mode, backbones)
    low = set(picked.loc[picked["train_fraction"] < 1.0, "benchmark"])
    picked = picked[picked["benchmark"].isin(low)]
    fractions = sorted(set(picked["train_fraction"].astype(float)))
    stats = _stat_rows(aggregate(picked, percent))
    decimals = DECIMALS[percent]
    n_full = max((s.n for s in stats.values()), default=0)
    columns = [(kind, frac) for kind in backbones for frac in fractions]
    rows, table_stats = [], {}
    for bench in benchmark_order(low):
        by_column = {col: stats.get((bench, *col)) for col in columns}
        cells: dict[tuple[str, float], Cell] = {}
        for frac in fractions:  # bold compares backbones at the same fraction
            group = [(kind, frac) for kind in backbones]
            cells.update(zip(group, _cells([by_column[c] for c in group], decimals, n_full)))
        metric = next(s.metric for s in by_column.values() if s is not None)
        rows.append((Cell(bench), Cell(metric_name(metric)), *(cells[c] for c in columns)))
        table_stats[bench] = {f"{kind}@{frac:g}": s for (kind, frac), s in by_column.items() if s is not None}
    header = ("Benchmark", "Metric", *(f"{backbone_name(k)} {fraction_label(f)}" for k, f in columns))
    return Table(header, tuple(rows), "ll" + "c" * len(columns), table_stats)


# ---------------------------------------------------------------------------------------------------------
# Renderers
# ---------------------------------------------------------------------------------------------------------

MARKDOWN_ALIGN: dict[str, str] = {"l": ":---", "c": ":---:", "r": "---:"}


def to_markdown(table: Table) -> str:
    """A GitHub Markdown table; bold cells as ``**…**``."""
    def cell(c: Cell) -> str:
        return f"**{c.text}**" if c.bold else c.text

    lines = ["| " + " | ".join(table.header) + " |",
             "| " + " | ".join(MARKDOWN_ALIGN[a] for a in table.align) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    """Escape LaTeX specials (``_ % & # $ { } ~ ^ \\``); ``±`` -> ``$\\pm$``, ``–`` -> ``--``."""
    return text.translate(LATEX_ESCAPES)


def to_latex(table: Table) -> str:
    """A complete ``tabular`` with booktabs rules (``\\usepackage{booktabs}``); bold cells as
    ``\\textbf{…}``."""
    def cell(c: Cell) -> str:
        text = latex_escape(c.text)
        return rf"\textbf{{{text}}}" if c.bold else text

    lines = [rf"\begin{{tabular}}{{{table.align}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in table.header) + r" \\", r"\midrule"]
    lines += [" & ".join(cell(c) for c in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_json(table: Table) -> dict[str, dict[str, dict[str, float | int | str]]]:
    """``{benchmark: {column key: {"metric", "mean", "std", "n", "n_upstream"}}}``; for the main table the key
    is the backbone kind. Missing cells are absent."""
    return {bench: {key: {"metric": s.metric, "mean": s.mean, "std": s.std, "n": s.n,
                          "n_upstream": s.n_upstream}
                    for key, s in cols.items()}
            for bench, cols in table.stats.items()}


# ---------------------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------------------


def low_data_figure(
    df: pd.DataFrame, out_png: str | Path, mode: str = "linear_probe", backbones: Sequence[str] | None = None,
    percent: bool = False,
) -> Path | None:
    """One panel per benchmark run at more than one train fraction: metric mean ± std over seeds against
    the fraction (log x axis, percent ticks), one line per backbone. Written atomically (temporary file, then
    rename). Returns the path, or ``None`` (and writes nothing) when no benchmark has more than one fraction.

    ``backbones`` defaults to every kind present (:data:`BACKBONE_NAMES` order first).
    """
    if backbones is None:
        backbones = backbone_order(df["backbone_kind"])
    agg = aggregate(_select(df, mode, backbones), percent)
    n_fractions = agg.groupby("benchmark")["train_fraction"].nunique()
    benches = benchmark_order(n_fractions[n_fractions > 1].index)
    if not benches:
        log.info("no benchmark has more than one train fraction; no low-data figure")
        return None
    ncols = min(len(benches), 3)
    nrows = math.ceil(len(benches) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, bench in zip(axes, benches):
        sub = agg[agg["benchmark"] == bench]
        fractions = sorted(set(sub["train_fraction"]))
        for kind in backbones:
            line = sub[sub["backbone_kind"] == kind].sort_values("train_fraction")
            if line.empty:
                continue
            ax.errorbar(line["train_fraction"], line["mean"], yerr=line["std"], marker="o", capsize=3,
                        label=backbone_name(kind))
        ax.set_xscale("log")
        ax.set_xticks(fractions, [fraction_label(f) for f in fractions])
        ax.minorticks_off()
        ax.set_title(bench)
        ax.set_xlabel("training data")
        ax.set_ylabel(metric_name(sub["metric"].iloc[0]) + (" (%)" if percent else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(benches):]:
        ax.set_visible(False)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=150)
    os.replace(tmp, out)
    log.info("wrote the low-data figure (%d panel(s)) to %s", len(benches), out)
    return out

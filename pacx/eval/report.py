"""A results directory -> one static, self-contained HTML page (``report.html``; ``scripts/make_report.py``).

Reads what the pipeline wrote (``table.json``, ``comparison.md``, ``low_data.png`` or the ``results.csv``
files, rollout and MAE reconstruction PNGs, each training run's ``metrics.csv``) and recomputes no number;
a section whose input is missing says ``not available: <what>``. Details: docs/design.md#results-report.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pacx.eval.paper import table_metrics
from pacx.eval.report_html import esc, figure_html, figure_png, markdown_html, unavailable
from pacx.eval.results import load_results
from pacx.eval.tables import (
    MISSING,
    PLUS_MINUS,
    backbone_name,
    backbone_order,
    benchmark_order,
    low_data_figure,
    metric_name,
)
from pacx.utils import write_text_atomic

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
# Folders never searched: bulk data, checkpoints, encoder exports, caches.
SKIP_DIRS = frozenset({"data", "checkpoints", "exports", "feature_cache", "manifests", "wandb",
                       "__pycache__"})
EVAL_STAGE_PREFIX = "stage3"  # Stage 3 runs (one per probe seed) get no learning curves
TRAIN_LOSS_COLUMNS = ("train/loss_epoch", "train/loss", "train/loss_step")  # first present wins
INFONCE_FRACTION_PREFIX = "val/infonce_frac_"
PROBE_COLUMN = "val/online_probe_auroc"

CSS = """
body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; margin: 0; color: #1b1f24;
       background: #fff; }
main { max-width: 1120px; margin: 0 auto; padding: 20px 32px 48px; }
h1 { font-size: 1.7rem; margin: 0 0 .3rem; }
h2 { font-size: 1.3rem; border-bottom: 2px solid #d0d7de; padding-bottom: .25rem; margin: 2rem 0 .6rem; }
h3 { font-size: 1.1rem; margin: 1.2rem 0 .4rem; }
h4 { font-size: 1rem; margin: 1rem 0 .4rem; }
p, li { line-height: 1.45; }
.meta, figcaption, .note { color: #57606a; font-size: .88rem; }
nav { margin: .6rem 0 0; font-size: .92rem; }
nav a { margin-right: 1rem; color: #0a58ca; }
table { border-collapse: collapse; margin: .5rem 0 .8rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: .35rem .75rem; text-align: left; vertical-align: middle; }
th { background: #f3f5f7; }
td.stat, td.missing, th.backbone { text-align: center; }
td.num { text-align: right; }
td.stat.best .value { font-weight: 700; }
td.stat .n { display: block; font-size: .75rem; color: #57606a; }
.unavailable { color: #7a2e00; background: #fff4e5; border-left: 4px solid #f0a020; padding: .45rem .75rem; }
figure { margin: .8rem 0 1.2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
.gallery { display: flex; flex-wrap: wrap; gap: 1.2rem; align-items: flex-start; }
.gallery figure { margin: 0; }
img.pixelated { image-rendering: pixelated; }
"""


# ---------------------------------------------------------------------------------------------------------
# Finding the inputs
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ReportInputs:
    """What :func:`find_inputs` found under ``root``; single files are the shallowest of their name."""

    root: Path
    table_json: Path | None = None
    comparison: Path | None = None
    low_data_png: Path | None = None
    results_csvs: list[Path] = field(default_factory=list)
    rollouts: list[Path] = field(default_factory=list)
    reconstructions: list[Path] = field(default_factory=list)  # the last grid of each run
    training_runs: list[tuple[Path, str]] = field(default_factory=list)  # (run dir, stage)


def _stage(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / "run.json").read_text()).get("stage") or "")
    except (OSError, ValueError):
        return ""


def _stage_rank(item: tuple[Path, str]) -> tuple[int, str, str]:
    """Stage 1 first, then the Stage 2 teachers, then Stage 2."""
    run_dir, stage = item
    rank = 0 if stage.startswith("stage1") else 2 if stage.startswith("stage2") else 1
    return rank, stage, run_dir.name


def find_inputs(root: str | Path) -> ReportInputs:
    """Walk ``root`` (skipping :data:`SKIP_DIRS`, hidden folders and the insides of Stage 3 runs) for the
    report's inputs. Raises ``FileNotFoundError`` when ``root`` is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"results directory {root} does not exist or is not a folder")
    found = ReportInputs(root)
    single: dict[str, list[Path]] = {"table.json": [], "comparison.md": [], "low_data.png": []}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files = set(filenames)
        if "run.json" in files:
            stage = _stage(here)
            if stage.startswith(EVAL_STAGE_PREFIX):
                dirnames[:] = []  # its test/ and validate/ logs are no learning curves
            elif "metrics.csv" in files:
                found.training_runs.append((here, stage))
        if here.name == "reconstructions" and (here.parent / "run.json").is_file():
            grids = sorted(here.glob("epoch*.png"))
            if grids:
                found.reconstructions.append(grids[-1])
        for name in sorted(files):
            if name in single:
                single[name].append(here / name)
            elif name == "results.csv":
                found.results_csvs.append(here / name)
            elif name.startswith("rollout") and name.endswith(".png"):
                found.rollouts.append(here / name)
    shallowest = {name: min(paths, key=lambda p: (len(p.parts), str(p)), default=None)
                  for name, paths in single.items()}
    found.table_json, found.comparison = shallowest["table.json"], shallowest["comparison.md"]
    found.low_data_png = shallowest["low_data.png"]
    found.training_runs.sort(key=_stage_rank)
    return found


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------


def table_html(table: Mapping[str, Mapping[str, Mapping]]) -> str:
    """``table.json`` as an HTML table: rows in registry order, backbones in
    :data:`~pacx.eval.tables.BACKBONE_NAMES` order. A cell shows ``mean ± std`` (3 decimals, 1 for a percent
    table), n runs and the upstream encoders behind them, and carries the exact JSON numbers as
    ``data-mean``, ``data-std``, ``data-n``, ``data-n-upstream``; the best displayed mean of a row (two or
    more cells) is bold."""
    kinds = backbone_order(k for row in table.values() for k in row)
    percent = any(float(s["mean"]) > 1.5 for row in table.values() for s in row.values())
    decimals = 1 if percent else 3
    head = "".join(f'<th class="backbone">{esc(backbone_name(k))}</th>' for k in kinds)
    rows = []
    for bench in benchmark_order(table):
        cells = table[bench]
        shown = [round(float(s["mean"]), decimals) for s in cells.values()]
        best = max(shown) if len(shown) > 1 else None
        metric = next(iter(cells.values()))["metric"]
        tds = []
        for kind in kinds:
            s = cells.get(kind)
            if s is None:
                tds.append(f'<td class="missing" id="cell-{esc(bench)}-{esc(kind)}">{MISSING}</td>')
                continue
            mean, std, n, n_up = float(s["mean"]), float(s["std"]), int(s["n"]), int(s.get("n_upstream", 1))
            bold = " best" if best is not None and round(mean, decimals) == best else ""
            runs = f"n={n}" + (f", {n_up} upstream" if n_up > 1 else "")
            tds.append(
                f'<td class="stat{bold}" id="cell-{esc(bench)}-{esc(kind)}" data-benchmark="{esc(bench)}" '
                f'data-backbone="{esc(kind)}" data-metric="{esc(s["metric"])}" data-mean="{mean!r}" '
                f'data-std="{std!r}" data-n="{n}" data-n-upstream="{n_up}">'
                f'<span class="value">{mean:.{decimals}f} {PLUS_MINUS} {std:.{decimals}f}</span>'
                f'<span class="n">{runs}</span></td>')
        rows.append(f'<tr id="row-{esc(bench)}"><th>{esc(bench)}</th><td>{esc(metric_name(metric))}</td>'
                    + "".join(tds) + "</tr>")
    return (f'<table id="main-table" class="results"><thead><tr><th>Benchmark</th><th>Metric</th>{head}</tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def low_data_png_from_results(csvs: Sequence[Path], mode: str = "linear_probe") -> bytes | None:
    """The low-data figure drawn from results CSVs in the low-data table's paper metric (each row's own
    metric when a benchmark lacks that column); ``None`` when no benchmark has two train fractions."""
    df = load_results(csvs)
    try:
        df = table_metrics(df, "low_data")
    except ValueError as err:
        log.warning("low-data figure in each row's own metric: %s", err)
    with tempfile.TemporaryDirectory() as tmp:
        out = low_data_figure(df, Path(tmp) / "low_data.png", mode=mode)
        return None if out is None else out.read_bytes()


def epoch_series(metrics: pd.DataFrame, column: str) -> pd.Series:
    """``column`` per epoch (the mean of its rows: one for an epoch-level metric, the steps for a step-level
    one), taken from the latest attempt that logged that epoch. Empty when the column is absent."""
    # here, not above: pacx.lit.history imports Lightning, which `make_report.py --help` and tables-only
    # reports need not load
    from pacx.lit.history import ATTEMPT_COLUMN

    if column not in metrics or "epoch" not in metrics:
        return pd.Series(dtype=float)
    rows = metrics.dropna(subset=[column, "epoch"])
    if ATTEMPT_COLUMN in rows:
        rows = rows[rows[ATTEMPT_COLUMN] == rows.groupby("epoch")[ATTEMPT_COLUMN].transform("max")]
    return rows.groupby("epoch")[column].mean().astype(float)


def curves_png(metrics: pd.DataFrame, title: str) -> bytes | None:
    """One row of panels for a run: loss (train, val), val InfoNCE / log N per pair with chance at 1 (when
    logged), online probe AUROC with chance at 0.5 (when logged). ``None`` when nothing is plottable."""
    train = next((epoch_series(metrics, c) for c in TRAIN_LOSS_COLUMNS if c in metrics),
                 pd.Series(dtype=float))
    panels = []
    loss = [(name, s) for name, s in (("train", train), ("val", epoch_series(metrics, "val/loss"))) if len(s)]
    if loss:
        panels.append(("loss", "loss", loss, None))
    pairs = sorted(c for c in metrics.columns if c.startswith(INFONCE_FRACTION_PREFIX))
    infonce = [(c.removeprefix(INFONCE_FRACTION_PREFIX), epoch_series(metrics, c)) for c in pairs]
    if any(len(s) for _, s in infonce):
        panels.append(("val InfoNCE / log N", "fraction of chance", infonce, (1.0, "chance (log N)")))
    probe = epoch_series(metrics, PROBE_COLUMN)
    if len(probe):
        panels.append(("online linear probe", "val AUROC", [("probe", probe)], (0.5, "chance")))
    if not panels:
        return None
    fig = Figure(figsize=(3.7 * len(panels), 2.9), layout="constrained")
    fig.suptitle(title, fontsize="medium")
    for ax, (name, ylabel, lines, chance) in zip(fig.subplots(1, len(panels), squeeze=False).ravel(), panels):
        for label, series in lines:
            ax.plot(series.index, series.values, marker="o", markersize=3, label=label)
        if chance is not None:
            ax.axhline(chance[0], color="0.4", linestyle="--", linewidth=1, label=chance[1])
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return figure_png(fig)


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def render_report(inputs: ReportInputs) -> str:
    """The report page for :func:`find_inputs` output."""
    root = inputs.root
    sections = []

    if inputs.table_json is not None:
        body = (table_html(json.loads(inputs.table_json.read_text()))
                + f'<p class="note">Mean {PLUS_MINUS} sample std over n runs (probe seeds, pooled over '
                f"upstream encoders where several); the best mean of a row in bold. From "
                f"<code>{esc(_relative(inputs.table_json, root))}</code>.</p>")
    else:
        body = unavailable("table.json (scripts/make_tables.py RESULTS.csv --json table.json writes it)")
    sections.append(("table", "Paper-style table", body))

    if inputs.comparison is not None:
        body = (markdown_html(inputs.comparison.read_text())
                + f'<p class="note">From <code>{esc(_relative(inputs.comparison, root))}</code>.</p>')
    else:
        body = unavailable("comparison.md (scripts/make_tables.py writes it beside the low-data figure)")
    sections.append(("comparison", "Comparison with the published numbers", body))

    if inputs.low_data_png is not None:
        body = figure_html(inputs.low_data_png.read_bytes(), _relative(inputs.low_data_png, root),
                           "low-data curves")
    elif inputs.results_csvs:
        png = low_data_png_from_results(inputs.results_csvs)
        body = (figure_html(png, "drawn from " + ", ".join(_relative(p, root) for p in inputs.results_csvs),
                            "low-data curves") if png is not None
                else unavailable("low_data.png, and no benchmark in results.csv was run at two train "
                                 "fractions"))
    else:
        body = unavailable("low_data.png or a results.csv with runs at several train fractions")
    sections.append(("low-data", "Low-data curves", body))

    body = "".join(figure_html(p.read_bytes(), _relative(p, root) + ": each image, then each encoder's "
                               "rollout", "attention rollout") for p in inputs.rollouts)
    sections.append(("rollout", "Attention rollout",
                     body or unavailable("rollout*.png (scripts/attention_rollout.py writes it)")))

    body = "".join(figure_html(p.read_bytes(), f"{_relative(p.parent.parent, root)}, {p.stem}: rows of "
                               "original | masked | reconstruction", "MAE reconstructions", min_width=400)
                   for p in inputs.reconstructions)
    sections.append(("reconstructions", "MAE reconstructions",
                     f'<div class="gallery">{body}</div>' if body
                     else unavailable("reconstructions/epoch*.png in a Stage 1 run (ReconstructionGrid)")))

    figures = []
    for run_dir, stage in inputs.training_runs:
        name = _relative(run_dir, root)
        png = curves_png(pd.read_csv(run_dir / "metrics.csv"), f"{name} ({stage or 'unknown stage'})")
        figures.append(figure_html(png, f"{name}/metrics.csv", f"learning curves of {name}")
                       if png is not None
                       else unavailable(f"a loss, InfoNCE or probe column in {name}/metrics.csv"))
    sections.append(("curves", "Learning curves", f'<div class="gallery">{"".join(figures)}</div>' if figures
                     else unavailable("metrics.csv of a Stage 1 or Stage 2 run (a folder with run.json and "
                                      "metrics.csv)")))

    nav = "".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title, _ in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>PaCX-MAE report: {esc(root.resolve().name)}</title><style>{CSS}</style></head>\n"
            "<body><main><h1>PaCX-MAE results report</h1>"
            f"<p class=\"meta\">Results directory <code>{esc(root.resolve())}</code>; "
            "a static page written by <code>scripts/make_report.py</code>, every figure embedded.</p>"
            f"<nav>{nav}</nav>\n" + "\n".join(_section(*s) for s in sections) + "\n</main></body></html>\n")


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of the results directory ``root`` to ``out`` (default ``<root>/report.html``),
    atomically; returns its path."""
    inputs = find_inputs(root)
    out = Path(out) if out is not None else Path(root) / REPORT_FILE
    write_text_atomic(out, render_report(inputs))
    log.info("wrote the report %s (table %s, %d training run(s), %d rollout, %d reconstruction figure(s))",
             out, "yes" if inputs.table_json else "no", len(inputs.training_runs), len(inputs.rollouts),
             len(inputs.reconstructions))
    return out

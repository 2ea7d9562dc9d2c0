#!/usr/bin/env python
"""Render the paper's tables (mean ± std over seeds) and the low-data figure from Stage 3 results CSVs.

    python scripts/make_tables.py runs/stage3/results.csv [more.csv ...] --percent --json table.json

Prints the main table (Markdown, then LaTeX), then — when any run used less than the full training set —
the low-data table (Markdown, then LaTeX), and writes the low-data figure to ``<out-dir>/low_data.png``
(default: the folder of the first CSV) and the reproduction report ``comparison.md`` (our numbers beside the
paper's published ones; ``--comparison`` moves it). See :mod:`pacx.eval.tables` and :mod:`pacx.eval.paper`.

Each table is in its paper metric, taken from the benchmark registry: the main table in each benchmark's
``metric`` (F1 for CheXchoNet and VinDr), the low-data table and figure in AUROC (``low_data_metric``).
``--metric BENCHMARK=COLUMN`` tabulates a benchmark by another logged column in every table.

Rows of debug runs (a ``debug`` cell naming ``fast_dev_run`` / ``overfit_batches`` / ``limit_*`` flags,
:mod:`pacx.debug`) are refused with an error listing them; ``--allow-debug`` tabulates them anyway (logged).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pacx.debug import DebugRunError, is_debug_row
from pacx.eval.paper import comparison_markdown, table_metrics
from pacx.eval.results import load_results, use_metric
from pacx.eval.tables import (
    BACKBONE_NAMES,
    low_data_figure,
    low_data_table,
    main_table,
    to_json,
    to_latex,
    to_markdown,
)
from pacx.utils import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


def check_debug_rows(df, allow: bool) -> None:
    """Refuse results rows of debug runs unless ``allow`` (then log how many are used)."""
    rows = df[df["debug"].map(is_debug_row)] if "debug" in df.columns else df.iloc[:0]
    if rows.empty:
        return
    listed = "; ".join(f"{r.benchmark} {r.backbone_kind} ({r.debug}) in {r.run_dir}"
                       for r in rows.head(5).itertuples())
    if not allow:
        raise DebugRunError(f"{len(rows)} results row(s) come from debug runs (first: {listed}); their "
                            "numbers are not results. Rerun them without debug flags, or pass "
                            "--allow-debug")
    log.warning("tabulating %d results row(s) of debug runs (--allow-debug): %s", len(rows), listed)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results CSV(s) written by Stage3 test runs")
    parser.add_argument("--mode", default="linear_probe",
                        help="classification mode to tabulate (default linear_probe)")
    parser.add_argument("--backbones", nargs="+", default=["imagenet", "mae", "pacx"],
                        help=f"backbone kinds, in column order (known: {', '.join(BACKBONE_NAMES)})")
    parser.add_argument("--out-dir", type=Path, default=None, help="figure folder (default: the first CSV's)")
    parser.add_argument("--percent", action="store_true", help="show metrics × 100 with 1 decimal")
    parser.add_argument("--json", type=Path, default=None, help="also write the main table as JSON here")
    parser.add_argument("--metric", action="append", default=[], metavar="BENCHMARK=COLUMN",
                        help="tabulate a benchmark by another test metric in every table, e.g. "
                             "chexchonet=test/auroc (default: each table's paper metric from the registry)")
    parser.add_argument("--comparison", type=Path, default=None,
                        help="where to write comparison.md, ours beside the published numbers (default: "
                             "<out-dir>/comparison.md)")
    parser.add_argument("--allow-debug", action="store_true",
                        help="tabulate rows of debug runs (fast_dev_run / overfit_batches / limit_*) too")
    args = parser.parse_args(argv)

    df = load_results(args.results)
    check_debug_rows(df, args.allow_debug)
    overrides = []
    for override in args.metric:
        benchmark, sep, column = override.partition("=")
        if not sep:
            parser.error(f"--metric takes BENCHMARK=COLUMN, got {override!r}")
        overrides.append((benchmark, column))
    low_data = bool((df["train_fraction"] < 1.0).any())
    tables = {}  # each table's rows in its paper metric, then the explicit overrides
    for name in ("main", "low_data") if low_data else ("main",):
        tables[name] = table_metrics(df, name)
        for benchmark, column in overrides:
            tables[name] = use_metric(tables[name], benchmark, column)
    tables.setdefault("low_data", tables["main"])  # no low-data runs: nothing to re-score
    log.info("%d results rows from %d file(s)", len(df), len(args.results))
    table = main_table(tables["main"], mode=args.mode, backbones=args.backbones, percent=args.percent)
    sys.stdout.write(to_markdown(table) + "\n" + to_latex(table))
    if args.json is not None:
        write_json_atomic(args.json, to_json(table))
        sys.stdout.write(f"\n{args.json}\n")
    out_dir = args.out_dir if args.out_dir is not None else args.results[0].parent
    if low_data:
        low = low_data_table(tables["low_data"], mode=args.mode, backbones=args.backbones,
                             percent=args.percent)
        sys.stdout.write("\n" + to_markdown(low) + "\n" + to_latex(low))
        figure = low_data_figure(tables["low_data"], out_dir / "low_data.png", mode=args.mode,
                                 backbones=args.backbones, percent=args.percent)
        if figure is not None:
            sys.stdout.write(f"\n{figure}\n")
    comparison = args.comparison if args.comparison is not None else out_dir / "comparison.md"
    write_text_atomic(comparison, comparison_markdown(tables["main"], tables["low_data"], mode=args.mode))
    log.info("wrote the reproduction report %s", comparison)
    return 0


if __name__ == "__main__":
    sys.exit(main())

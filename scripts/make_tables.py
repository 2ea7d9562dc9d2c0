#!/usr/bin/env python
"""Render the paper's tables (mean ± std over seeds) and the low-data figure from Stage 3 results CSVs.

    python scripts/make_tables.py runs/stage3/results.csv [more.csv ...] --percent --json table.json

Prints the main table (Markdown, then LaTeX), then — when any run used less than the full training set —
the low-data table (Markdown, then LaTeX), and writes the low-data figure to ``<out-dir>/low_data.png``
(default: the folder of the first CSV). See :mod:`pacx.eval.tables`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pacx.eval.tables import (
    BACKBONE_NAMES,
    load_results,
    low_data_figure,
    low_data_table,
    main_table,
    to_json,
    to_latex,
    to_markdown,
    use_metric,
)
from pacx.utils import write_json_atomic


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results CSV(s) written by Stage3 test runs")
    parser.add_argument("--mode", default="linear_probe", help="classification mode to tabulate (default linear_probe)")
    parser.add_argument("--backbones", nargs="+", default=["imagenet", "mae", "pacx"],
                        help=f"backbone kinds, in column order (known: {', '.join(BACKBONE_NAMES)})")
    parser.add_argument("--out-dir", type=Path, default=None, help="figure folder (default: the first CSV's)")
    parser.add_argument("--percent", action="store_true", help="show metrics × 100 with 1 decimal")
    parser.add_argument("--json", type=Path, default=None, help="also write the main table as JSON here")
    parser.add_argument("--metric", action="append", default=[], metavar="BENCHMARK=COLUMN",
                        help="tabulate a benchmark by another test metric, e.g. chexchonet=test/auroc")
    args = parser.parse_args(argv)

    df = load_results(args.results)
    for override in args.metric:
        benchmark, sep, column = override.partition("=")
        if not sep:
            parser.error(f"--metric takes BENCHMARK=COLUMN, got {override!r}")
        df = use_metric(df, benchmark, column)
    logging.getLogger(__name__).info("%d results rows from %d file(s)", len(df), len(args.results))
    table = main_table(df, mode=args.mode, backbones=args.backbones, percent=args.percent)
    sys.stdout.write(to_markdown(table) + "\n" + to_latex(table))
    if args.json is not None:
        write_json_atomic(args.json, to_json(table))
        sys.stdout.write(f"\n{args.json}\n")
    if (df["train_fraction"] < 1.0).any():
        low = low_data_table(df, mode=args.mode, backbones=args.backbones, percent=args.percent)
        sys.stdout.write("\n" + to_markdown(low) + "\n" + to_latex(low))
        out_dir = args.out_dir if args.out_dir is not None else args.results[0].parent
        figure = low_data_figure(df, out_dir / "low_data.png", mode=args.mode, backbones=args.backbones,
                                 percent=args.percent)
        if figure is not None:
            sys.stdout.write(f"\n{figure}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

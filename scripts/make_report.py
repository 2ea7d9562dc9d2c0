#!/usr/bin/env python
"""Write one static, self-contained HTML report of a results directory (the demo's ``--out``, or any folder
holding ``table.json`` / ``comparison.md`` / ``low_data.png`` from ``scripts/make_tables.py`` and run
folders).

    python scripts/make_report.py demo_runs [--out demo_runs/report.html]

The page holds the paper-style table, the comparison with the published numbers, the low-data curves, the
attention rollout and MAE reconstruction figures, and the learning curves of every Stage 1/2 run, each section
saying "not available: ..." when its input is missing; no server, JavaScript or network is needed to view it.
See :mod:`pacx.eval.report`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pacx.eval.report import REPORT_FILE, write_report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", type=Path, help="the results directory to report on")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the HTML file (default RESULTS_DIR/{REPORT_FILE})")
    args = parser.parse_args(argv)
    sys.stdout.write(f"{write_report(args.results_dir, args.out)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Run a reproduction plan: Stage 1 → export → teachers → Stage 2 → export → Stage 3 grid → tables.

    python scripts/reproduce_paper.py plans/paper.yaml [--out DIR] [--set NAME=VALUE]  # sbatch the graph
    python scripts/reproduce_paper.py plans/paper.yaml --dry-run                      # print sbatch lines
    python scripts/reproduce_paper.py plans/demo.yaml --local --out DIR               # run here, in order

Re-running skips finished nodes (run.json "completed"). The plan format: docs/plans.md.
"""

import sys

from pacx.reproduce import main

if __name__ == "__main__":
    sys.exit(main())

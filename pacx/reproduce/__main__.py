"""``python -m pacx.reproduce exec NODE.json [--index I]`` runs one node or grid point (what
``scripts/slurm/node.sbatch`` and ``--local`` call); ``python -m pacx.reproduce PLAN.yaml ...`` is
``scripts/reproduce_paper.py``."""

from __future__ import annotations

import argparse
import logging
import sys

from pacx.reproduce import main
from pacx.reproduce.execute import execute


def exec_main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m pacx.reproduce exec",
                                     description="Run one node (or one grid point) of a plan from its spec.")
    parser.add_argument("spec", help="<out>/.plan/nodes/<node>.json, written by scripts/reproduce_paper.py")
    parser.add_argument("--index", type=int, default=None, help="the grid point (Slurm array index)")
    args = parser.parse_args(argv)
    return execute(args.spec, args.index)


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(exec_main(argv[1:]) if argv[:1] == ["exec"] else main(argv))

"""Reproduce the paper from one plan: ``python scripts/reproduce_paper.py plans/paper.yaml [--local]``.

A plan is a YAML dependency graph of Stage runs and scripts, submitted to Slurm, run here, or (the demo) run
in one process. The format and the drivers: docs/plans.md. Modules: plan (reading), values (fields, vars,
profiles), profiles, execute (one point), drivers, estimate and costs (GPU-hours from measured rates).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from pacx.reproduce.drivers import DRIVERS, format_table, run_local, summary
from pacx.reproduce.estimate import estimate_json, estimate_plan, format_estimate, read_rates
from pacx.reproduce.plan import PlanError, load_plan
from pacx.reproduce.profiles import claim_out_dir, format_differences, profile_differences
from pacx.utils import write_json_atomic

log = logging.getLogger("pacx.reproduce")


def _parse_set(values: list[str]) -> dict[str, str]:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def _profile_table(args, plan) -> str:
    """The settings that differ between the plan's profiles, resolved, side by side (``#`` lines)."""
    plans = {p: load_plan(args.plan, out=args.out, overrides=_parse_set(args.set), profile=p)
             for p in plan.profiles}
    return format_differences(profile_differences(plans), plan.profiles, plan.profile)


def _estimate(args) -> int:
    """``--estimate RATES``: the cost table of the plan (and profile) on stdout, ``--json`` its numbers."""
    try:
        plan = load_plan(args.plan, out=args.out, overrides=_parse_set(args.set), profile=args.profile)
        rates = read_rates(args.estimate)
    except (PlanError, OSError, ValueError) as err:
        log.error("%s", err)
        return 2
    rows = estimate_plan(plan, rates, args.estimate)
    sys.stdout.write(format_estimate(plan, rows, rates, args.estimate))
    if args.json is not None:
        write_json_atomic(args.json, estimate_json(plan, rows, args.estimate))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``scripts/reproduce_paper.py``: load the plan, run its driver, print (and ``--json``) a summary."""

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        description="Run a reproduction plan (plans/*.yaml) through Slurm or locally.")
    parser.add_argument("plan", type=Path, help="the plan YAML (plans/paper.yaml, plans/demo.yaml)")
    parser.add_argument("--local", action="store_true",
                        help="run the graph here, sequentially, instead of sbatch")
    parser.add_argument("--in-process", action="store_true",
                        help="with --local: run every point in this process (as the demo does) instead of "
                             "one subprocess each")
    parser.add_argument("--jobs", type=int, default=1,
                        help="with --local: run up to this many points of a `local_parallel` node at once, "
                             "each with cores / jobs CPU threads (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    parser.add_argument("--out", default=None, help="output directory (overrides the plan's `out`)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a plan var")
    parser.add_argument("--json", type=Path, default=None, help="write a summary (node states, job ids) here")
    parser.add_argument("--profile", default=None,
                        help="one of the plan's profiles (plans/paper.yaml: paper | authors; "
                             "default: the first)")
    parser.add_argument("--estimate", type=Path, default=None, metavar="RATES.json",
                        help="print GPU-hours per node from measured per-GPU rates "
                             "(scripts/benchmark_train.py --rates); run and write nothing but --json")
    args = parser.parse_args(argv)
    if args.in_process and not args.local:
        parser.error("--in-process goes with --local")
    if args.jobs != 1 and not args.local:
        parser.error("--jobs goes with --local")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.estimate is not None:
        return _estimate(args)
    try:
        plan = load_plan(args.plan, out=args.out, overrides=_parse_set(args.set), profile=args.profile)
        if args.dry_run and plan.profiles:
            sys.stdout.write(_profile_table(args, plan))
        elif not args.dry_run:
            claim_out_dir(plan)
    except PlanError as err:
        log.error("%s", err)
        return 2
    mode = "local" if args.local else "slurm"
    log.info("plan %s%s: %d nodes, %d points -> %s (%s%s)", plan.name,
             f" (profile {plan.profile})" if plan.profile else "", len(plan.nodes),
             sum(len(n.points) for n in plan.nodes.values()), plan.out, mode,
             ", dry run" if args.dry_run else "")
    try:
        driver = (functools.partial(run_local, in_process=args.in_process, jobs=args.jobs) if args.local
                  else DRIVERS[mode])
        outcomes = driver(plan, dry_run=args.dry_run)
    except RuntimeError as err:  # sbatch missing or refusing a job: what was submitted is in the message
        log.error("%s", err)
        return 1
    result = summary(plan, mode, args.dry_run, outcomes)
    if args.json is not None:
        write_json_atomic(args.json, result)
    (sys.stderr if args.dry_run else sys.stdout).write(format_table(outcomes) + "\n")
    failed = [n for n, o in outcomes.items() if o.status in ("failed", "blocked")]
    return 1 if failed else 0


__all__ = ["PlanError", "load_plan", "main"]

"""Reproduce the paper from one plan: Stage 1 → export → teachers → Stage 2 → export → the Stage 3 grid → tables.

    python scripts/reproduce_paper.py plans/paper.yaml [--out DIR] [--set NAME=VALUE ...]   # submit to Slurm
    python scripts/reproduce_paper.py plans/paper.yaml --dry-run                             # print the sbatch lines
    python scripts/reproduce_paper.py plans/paper.yaml --profile authors --dry-run           # the authors' settings
    python scripts/reproduce_paper.py plans/demo.yaml --local                                # run here, in order
    python scripts/reproduce_paper.py plans/paper.yaml --estimate rates.json                 # GPU-hours per node
    python -m pacx.reproduce exec <out>/.plan/nodes/<node>.json [--index I]                  # one node / grid point

A **plan** (YAML) is a dependency graph of nodes. Top-level keys:

``name``      used in job names (default: the file's stem).
``out``       where everything lands (relative paths: from the repository root); ``--out`` overrides.
``python``    the interpreter of every job (null: ``$PACX_PYTHON``, else the one running the driver).
``trainer``   the trainer fragment given to every Stage node as ``--trainer <file>``
              (``configs/trainer/ddp.yaml`` on GPU clusters, ``configs/trainer/cpu.yaml`` on CPUs).
``seed``      ``--seed_everything`` of every Stage node (null: the config's own).
``vars``      free values, used in any string as ``{name}`` (dataset roots, weight files); a var may use
              ``{out}`` and the vars above it; ``--set NAME=VALUE`` overrides one.
``slurm``     ``sbatch_args`` (partition, account, ``--export``, ... added to every sbatch) and ``defaults``
              (``nodes``, ``tasks_per_node``, ``gpus_per_node`` (0: none asked), ``cpus_per_task``,
              ``time``, ``mem``) for every node.
``nodes``     a list of nodes.
``profiles``  optional: named sets of override configs per stage node (``--profile NAME``, default the first);
              ``{profile}`` is defined in every string, ``out`` included (:mod:`~pacx.reproduce.profiles`).

Node keys: ``name`` (an identifier), ``after`` (names of the nodes it needs), and either

* ``stage: Stage1_MAE.py`` (or the teachers' ``pacx/teachers/train.py``) + ``config`` (+ ``args``, ``seed``,
  ``trainer`` to override the plan's):
  runs ``<Stage>.main(["fit", "--config", config, "--trainer", fragment, "--trainer.default_root_dir",
  run_dir, "--seed_everything", seed, *args])`` (``--ckpt_path last`` added when resuming); ``config`` may be
  a list, stacked in order (a Stage 3 mode's base, then the benchmark's override); or
* ``script: [argv...]`` (+ ``args``, ``stdout``): runs ``<python> argv...`` from the repository root
  (``[scripts/make_tables.py, ...]``, ``[-m, pacx.demo.phantom, ...]``); ``stdout`` is a file for its
  standard output.

and optionally ``resources`` (overrides ``slurm.defaults``), ``sbatch_args``, ``run_dir`` (default
``{out}/runs/{node}``, for a grid ``{out}/runs/{node}/{point}``), and ``grid``: a mapping axis → values
that makes the node one run per combination (a Slurm job array; ``max_parallel`` caps the tasks running
at once). A **list** axis (``seed: [0, 1, 2]``) is used as ``{seed}`` in ``config``, ``args``, ``seed``,
``run_dir``; a **mapping** axis (``backbone: {mae: [--model.backbone.kind, mae, ...], ...}``) also
appends the chosen value's argument list. Points are named ``axis=value_axis=value`` in axis order.

Every string may use ``{out}``, ``{node}``, ``{run_dir}``, ``{point}`` (the grid point's name), the vars and
the node's grid axes; ``{{`` / ``}}`` are literal braces. A node (grid point) is finished when its
``<run_dir>/run.json`` says ``"status": "completed"`` (the Stage CLIs write it; for scripts the executor
does), and re-running the plan skips finished work.

Modules: :mod:`~pacx.reproduce.plan` (reading and validating), :mod:`~pacx.reproduce.profiles` (profiles and
their resolved differences), :mod:`~pacx.reproduce.execute` (one node), :mod:`~pacx.reproduce.drivers`
(Slurm submission, local runs, dry runs), :mod:`~pacx.reproduce.estimate` (GPU-hours from measured rates).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pacx.reproduce.plan import PlanError, load_plan

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
    from pacx.reproduce.profiles import format_differences, profile_differences

    plans = {p: load_plan(args.plan, out=args.out, overrides=_parse_set(args.set), profile=p) for p in plan.profiles}
    return format_differences(profile_differences(plans), plan.profiles, plan.profile)


def _estimate(args) -> int:
    """``--estimate RATES``: the cost table of the plan (and profile) on stdout, ``--json`` its numbers."""
    from pacx.reproduce.estimate import estimate_json, estimate_plan, format_estimate, read_rates
    from pacx.utils import write_json_atomic

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
    from pacx.reproduce.drivers import DRIVERS, format_table, summary
    from pacx.reproduce.profiles import claim_out_dir
    from pacx.utils import write_json_atomic

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Run a reproduction plan (plans/*.yaml) through Slurm or locally.")
    parser.add_argument("plan", type=Path, help="the plan YAML (plans/paper.yaml, plans/demo.yaml)")
    parser.add_argument("--local", action="store_true", help="run the graph here, sequentially, instead of sbatch")
    parser.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    parser.add_argument("--out", default=None, help="output directory (overrides the plan's `out`)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a plan var")
    parser.add_argument("--json", type=Path, default=None, help="write a summary (node states, job ids) here")
    parser.add_argument("--profile", default=None,
                        help="one of the plan's profiles (plans/paper.yaml: paper | authors; default: the first)")
    parser.add_argument("--estimate", type=Path, default=None, metavar="RATES.json",
                        help="print GPU-hours per node from measured per-GPU rates (scripts/benchmark_train.py "
                             "--rates); run and write nothing but --json")
    args = parser.parse_args(argv)
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
             sum(len(n.points) for n in plan.nodes.values()), plan.out, mode, ", dry run" if args.dry_run else "")
    try:
        outcomes = DRIVERS[mode](plan, dry_run=args.dry_run)
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

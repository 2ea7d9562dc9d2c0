"""The built-in demo (``make demo``): ``python -m pacx.demo --out demo_runs [--quick] [--only NODE ...]``.

Runs ``plans/demo.yaml`` (profile ``full``, or ``quick``) in this process through the reproduction executor
(:mod:`pacx.reproduce`), skipping finished points, so an interrupted demo continues where it stopped; the
Stage 3 runs go two at a time in two worker processes (``--jobs``). Writes
``demo_summary.json`` (seconds and outputs per node) and prints the steps, the table and its story.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pacx.progress import NO_PROGRESS_HELP, set_progress
from pacx.reproduce.drivers import Outcome, run_local
from pacx.reproduce.plan import REPO, PlanError, load_plan
from pacx.reproduce.profiles import claim_out_dir
from pacx.utils import cores, write_json_atomic

log = logging.getLogger("pacx.demo")

PLAN = REPO / "plans" / "demo.yaml"
SUMMARY = "demo_summary.json"


def outputs(out: Path) -> dict[str, str]:
    """The demo's main outputs that exist under ``out`` (name -> path)."""
    candidates = {"table_md": out / "table.md", "table_json": out / "table.json",
                  "report": out / "report.html", "mae_encoder": out / "exports" / "mae_encoder.safetensors",
                  "rollout": out / "figures" / "rollout.png", "low_data": out / "figures" / "low_data.png",
                  "alignment": out / "alignment.json", "zero_shot": out / "zero_shot.json",
                  "ceiling": out / "ceiling.json", "results": out / "stage3" / "results.csv"}
    found = {k: str(p) for k, p in candidates.items() if p.is_file()}
    for path in sorted((out / "exports").glob("pacx_encoder_s*.safetensors")):
        found[path.stem] = str(path)
    reconstructions = sorted((out / "stage1_mae" / "reconstructions").glob("*.png"))
    if reconstructions:
        found["reconstructions"] = str(reconstructions[-1])
    return found


def node_lines(summary: dict) -> str:
    lines = [f"{'node':<12} {'seconds':>8}  {'points':>6}  status"]
    for name, res in summary["nodes"].items():
        seconds = "-" if res["seconds"] is None else res["seconds"]
        lines.append(f"{name:<12} {seconds:>8}  {res['points']:>6}  {res['status']}")
    return "\n".join(lines)


def default_jobs() -> int:
    """Two at a time where there are two cores (the Stage 3 runs are mostly single-threaded Python)."""
    return min(2, cores())


def run_demo(out: str | Path, quick: bool = False, wandb: str = "offline", only: list[str] | None = None,
             plan: str | Path = PLAN, jobs: int = 1) -> dict:
    """Run the demo plan into ``out``; returns the summary (``nodes``: status, points and seconds per node,
    ``outputs``: the main files). A node that finished in an earlier call keeps its recorded seconds.
    ``jobs``: how many points of a ``local_parallel`` node (the Stage 3 runs) run at once; above 1, the
    Stage 2 seeds also run side by side (their node's ``local_parallel: 3``;
    :class:`pacx.reproduce.drivers.PointPool`)."""
    loaded = load_plan(plan, out=out, overrides={"wandb": wandb}, profile="quick" if quick else "full")
    claim_out_dir(loaded)
    summary_path = loaded.out / SUMMARY
    previous = json.loads(summary_path.read_text())["nodes"] if summary_path.is_file() else {}
    outcomes: dict[str, Outcome] = run_local(loaded, in_process=True, only=only, jobs=jobs)
    nodes = {}
    for name in loaded.nodes:  # plan order (the JSON file's keys are sorted)
        if name not in outcomes:  # not selected by `only`
            if name in previous:
                nodes[name] = previous[name]
            continue
        ran = outcomes[name].status != "done"
        nodes[name] = {"status": outcomes[name].status, "points": outcomes[name].points,
                       "seconds": outcomes[name].seconds if ran else previous.get(name, {}).get("seconds")}
    summary = {"nodes": nodes, "profile": loaded.profile, "outputs": outputs(loaded.out)}
    write_json_atomic(summary_path, summary)
    table = loaded.out / "table.md"
    sys.stdout.write(node_lines(summary) + "\n" + (f"\n{table.read_text()}" if table.is_file() else "")
                     + (f"\nreport: {summary['outputs']['report']}\n"
                        if "report" in summary["outputs"] else ""))
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        description="Run the pacx demo (plans/demo.yaml) on the generated phantom.")
    parser.add_argument("--out", default="demo_runs", help="output directory (default demo_runs)")
    parser.add_argument("--quick", action="store_true",
                        help="profile quick: a reduced, faster version (about 1.5 min on 2 cores)")
    parser.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    parser.add_argument("--only", nargs="*",
                        help="run only these nodes of the plan (e.g. stage3 story report)")
    parser.add_argument("--plan", default=str(PLAN), help="the demo plan (default plans/demo.yaml)")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="Stage 3 runs at once, each with cores / jobs threads (default: 2 on two or "
                             "more cores, else 1; above 1, the Stage 2 seeds also run side by side, each "
                             "with cores / seeds threads; the numbers may differ between values)")
    parser.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.no_progress:
        set_progress(False)
    try:
        summary = run_demo(args.out, args.quick, args.wandb, args.only, args.plan, args.jobs)
    except (PlanError, ValueError) as err:
        log.error("%s", err)
        return 2
    failed = [n for n, r in summary["nodes"].items() if r["status"] in ("failed", "blocked")]
    if failed:
        log.error("demo nodes failed or blocked: %s (their logs are above; re-run to continue)",
                  ", ".join(failed))
    return 1 if failed else 0

"""Running a plan's graph: submitted to Slurm, or here in order (one subprocess per point, or in process).

Both walk the nodes in topological order, skip every point whose ``run.json`` says ``completed`` and run
points through the same executor (:mod:`pacx.reproduce.execute`); ``dry_run`` prints what would be done.
Behaviour of each driver: docs/plans.md#drivers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pacx.progress import progress_switched_on, set_progress
from pacx.reproduce.execute import (
    COMPLETED,
    RUN_RECORD,
    execute_point,
    exit_code,
    node_spec,
    run_status,
    write_specs,
)
from pacx.reproduce.plan import REPO, Node, Plan
from pacx.utils import cores, write_json_atomic

log = logging.getLogger(__name__)

SBATCH_TEMPLATE = REPO / "scripts" / "slurm" / "node.sbatch"
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


def _record_time(run_dir: str, key: str) -> str:
    """``run.json``'s ``key`` timestamp (``YYYY-MM-DDTHH:MM:SS``, which sorts as text; ``""`` if none)."""
    try:
        return str(json.loads((Path(run_dir) / RUN_RECORD).read_text()).get(key) or "")
    except (OSError, ValueError):
        return ""


def pending(node: Node, plan: Plan, upstream_todo: Mapping[str, list[int]]) -> list[int]:
    """Indices of the node's points to run: those whose run.json does not say completed, and, for a script
    node (tables, reports, probes: cheap, and they read what their ``after`` nodes wrote), every point when
    an upstream node has points to run (``upstream_todo``) or a completed point that started before an
    upstream point last finished (a benchmark added to the plan, a seed re-run). Stage runs, once
    completed, never run again."""
    todo = [p.index for p in node.points if run_status(p.run_dir) != COMPLETED]
    if node.kind != "script" or len(todo) == len(node.points):
        return todo
    upstream = [plan.nodes[name] for name in node.after if name in plan.nodes]
    if any(upstream_todo.get(up.name) for up in upstream):
        return [p.index for p in node.points]
    finished = max((_record_time(p.run_dir, "updated") for up in upstream for p in up.points), default="")
    stale = [p.index for p in node.points
             if p.index not in todo and _record_time(p.run_dir, "started") < finished]
    if stale:
        log.info("%s: %d completed point(s) started before an upstream run last finished: run again",
                 node.name, len(stale))
    return sorted(set(todo) | set(stale))


def array_ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2,5,7-8"`` (Slurm's ``--array`` syntax)."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)


def exec_command(plan: Plan, node: Node, index: int | None) -> list[str]:
    cmd = [plan.python, "-m", "pacx.reproduce", "exec", str(plan.spec_path(node.name))]
    return cmd + (["--index", str(index)] if node.is_grid else [])


@dataclass
class Outcome:
    """What a driver did with one node (the ``--json`` summary)."""

    kind: str
    points: int
    pending: list[int]
    status: str  # done | submitted | queued | would submit | completed | failed | blocked | would run
    job_id: str | None = None
    failed: list[int] = field(default_factory=list)
    seconds: float | None = None  # local runs: the node's wall time


def _unfinished(plan: Plan, outcomes: dict[str, Outcome], lines: list[str]):
    """``(node, pending indices, outcome)`` of each node with points left, in plan order; a finished node
    gets a ``done`` outcome and a comment line instead."""
    todos: dict[str, list[int]] = {}
    for node in plan.nodes.values():
        todo = todos[node.name] = pending(node, plan, todos)
        outcome = outcomes[node.name] = Outcome(node.kind, len(node.points), todo, "done")
        if not todo:
            lines.append(f"# {node.name}: all {len(node.points)} point(s) completed, skipped")
            continue
        yield node, todo, outcome


# ---- Slurm ----------------------------------------------------------------------------------------


def sbatch_command(plan: Plan, node: Node, indices: list[int], dependencies: list[str],
                   spec: Path | None = None) -> list[str]:
    """The ``sbatch`` argv of ``indices`` of ``node`` (an array job for a grid), after ``dependencies``,
    reading ``spec`` (default ``nodes/<node>.json``)."""
    r = node.resources
    cmd = ["sbatch", "--parsable", f"--job-name={plan.name}-{node.name}", f"--nodes={r.nodes}",
           f"--ntasks-per-node={r.tasks_per_node}", f"--cpus-per-task={r.cpus_per_task}", f"--time={r.time}"]
    if r.gpus_per_node:
        cmd.append(f"--gpus-per-node={r.gpus_per_node}")
    if r.mem:
        cmd.append(f"--mem={r.mem}")
    if node.is_grid:
        limit = f"%{node.max_parallel}" if node.max_parallel else ""
        cmd += [f"--array={array_ranges(indices)}{limit}", f"--output={plan.logs}/%x-%A_%a.out"]
    else:
        cmd.append(f"--output={plan.logs}/%x-%j.out")
    if dependencies:
        cmd += ["--dependency=afterok:" + ":".join(dependencies), "--kill-on-invalid-dep=yes"]
    spec = spec if spec is not None else plan.spec_path(node.name)
    return [*cmd, *plan.sbatch_args, *node.sbatch_args, str(SBATCH_TEMPLATE), str(spec)]


def _job_active(job_id: str, env: Mapping[str, str]) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True)
    return out.returncode == 0 and bool(set(out.stdout.split()) & ACTIVE_STATES)


def spec_snapshot(plan: Plan, node: Node) -> Path:
    """The node's spec as submitted, under a name fixed by its content (``nodes/<sha>/<node>.json``): a job
    that waits in the queue runs the points it was submitted with, even after the plan is edited and
    ``nodes/<node>.json`` rewritten (a new benchmark in a list can renumber a grid's points)."""
    spec = node_spec(plan, node)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = plan.spec_path(node.name).parent / digest / f"{node.name}.json"
    if not path.is_file():
        write_json_atomic(path, spec)
    return path


def _submissions(jobs: dict, node: str) -> list[dict]:
    """The node's submissions recorded in ``jobs.json`` (a list; a file from before a node could hold several
    jobs has one dict)."""
    subs = jobs.get(node, [])
    return [subs] if isinstance(subs, dict) else list(subs)


def _covered(node: Node, running: list[dict]) -> set[str]:
    """Run directories of ``node`` that its queued or running jobs will run (by index for records without
    ``run_dirs``)."""
    by_index = {p.index: str(p.run_dir) for p in node.points}
    covered = set()
    for sub in running:
        dirs = sub.get("run_dirs")
        if dirs is None:
            dirs = [by_index[i] for i in sub.get("indices", []) if i in by_index]
        covered |= set(dirs)
    return covered


def run_slurm(plan: Plan, dry_run: bool = False, env: Mapping[str, str] | None = None) -> dict[str, Outcome]:
    """Submit every node with unfinished points, in plan order, each after its upstream jobs (``afterok``).
    A node's earlier jobs that are still queued or running (``<out>/.plan/jobs.json``) are not submitted
    again; only its pending points that none of them covers go into a new job."""
    env = {**(env if env is not None else os.environ), "PACX_PYTHON": plan.python}
    jobs_file = plan.state_dir / "jobs.json"
    jobs = json.loads(jobs_file.read_text()) if jobs_file.is_file() else {}
    ids: dict[str, list[str]] = {}
    outcomes: dict[str, Outcome] = {}
    lines = [f"# plan {plan.name} ({plan.path}) -> {plan.out}", f"mkdir -p {shlex.quote(str(plan.logs))}"]
    if not dry_run:
        if shutil.which("sbatch", path=env.get("PATH")) is None:
            raise RuntimeError("sbatch not found on PATH: run this on a Slurm login node, or use --local")
        plan.logs.mkdir(parents=True, exist_ok=True)
        write_specs(plan)
    for node, todo, outcome in _unfinished(plan, outcomes, lines):
        running = [] if dry_run else [s for s in _submissions(jobs, node.name)
                                      if _job_active(s["job_id"], env)]
        ids[node.name] = [s["job_id"] for s in running]
        covered = _covered(node, running)
        points = {p.index: p for p in node.points}
        todo = [i for i in todo if str(points[i].run_dir) not in covered]
        if not todo:
            outcome.job_id = ids[node.name][-1]
            outcome.status = "queued"
            log.info("%s: job(s) %s from an earlier submission are still queued or running", node.name,
                     ", ".join(ids[node.name]))
            fresh = [up for up in node.after if outcomes.get(up) and outcomes[up].status == "submitted"]
            if fresh and node.kind == "script":
                log.warning("%s: its queued job(s) %s do not wait for the new job(s) of %s: run the plan "
                            "again once those are done to bring %s up to date", node.name,
                            ", ".join(ids[node.name]), ", ".join(fresh), node.name)
            continue
        deps = [f"${p}" if dry_run else job for p in node.after for job in ids.get(p, [])]
        if dry_run:
            cmd = sbatch_command(plan, node, todo, deps)
            quoted = " ".join(a if a.startswith("--dependency=") else shlex.quote(a) for a in cmd)
            lines.append(f"{node.name}=$({quoted})")
            ids[node.name] = [f"${node.name}"]
            outcome.status = "would submit"
            continue
        cmd = sbatch_command(plan, node, todo, deps, spec_snapshot(plan, node))
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            submitted = {n: o.job_id for n, o in outcomes.items() if o.status == "submitted"}
            raise RuntimeError(f"sbatch of node {node.name!r} failed (exit {done.returncode}): "
                               f"{done.stderr.strip()}; already submitted: {submitted or 'nothing'}")
        outcome.job_id = done.stdout.strip().split(";")[0]
        ids[node.name].append(outcome.job_id)
        outcome.status = "submitted"
        jobs[node.name] = [*running, {"job_id": outcome.job_id, "indices": todo,
                                      "run_dirs": [str(points[i].run_dir) for i in todo], "command": cmd,
                                      "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}]
        write_json_atomic(jobs_file, jobs)
        others = ", ".join(s["job_id"] for s in running)
        log.info("%s: submitted job %s (%d point(s)%s%s)", node.name, outcome.job_id, len(todo),
                 f", after {':'.join(deps)}" if deps else "",
                 f"; job(s) {others} run the others" if others else "")
    if dry_run:
        sys.stdout.write("\n".join(lines) + "\n")
    return outcomes


# ---- local ----------------------------------------------------------------------------------------


def _start_worker(threads: int, level: int, fmt: str | None, progress: bool) -> None:
    """A pool worker: ``threads`` torch threads, the parent's log format and progress switch."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format=fmt or logging.BASIC_FORMAT)
    set_progress(progress)


def _run_subprocess(cmd: list[str], env: Mapping[str, str]) -> int:
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


class PointPool:
    """Runs the points of a ``local_parallel`` node ``jobs`` at a time, each with ``cores // jobs`` CPU
    threads, at least one (``--jobs N``, or the node's ``local_parallel: k``): in worker processes started
    once for the whole plan (``in_process``: each imports torch and Lightning once, as the demo's single
    process does), or as subprocesses with ``OMP_NUM_THREADS`` set.

    The thread count changes the order of floating-point sums, so a point's numbers may differ in the last
    digits from a run with other ``--jobs``.
    """

    def __init__(self, jobs: int, in_process: bool, env: Mapping[str, str]) -> None:
        self.jobs, self.in_process = jobs, in_process
        self.threads = max(1, cores() // jobs)
        self.env = {**env, "OMP_NUM_THREADS": str(self.threads)}
        self._executor: Executor | None = None

    def executor(self) -> Executor:
        if self._executor is None:
            if self.in_process:  # spawn: a forked child would inherit the parent's torch thread pools
                root = logging.getLogger()
                handler = root.handlers[0] if root.handlers else None
                fmt = handler.formatter._fmt if handler is not None and handler.formatter else None
                self._executor = ProcessPoolExecutor(
                    self.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                    initargs=(self.threads, root.level, fmt, progress_switched_on()))
            else:
                self._executor = ThreadPoolExecutor(self.jobs)
        return self._executor

    def run(self, plan: Plan, node: Node, spec: dict | None, todo: list[int]) -> dict[int, int]:
        """Point index -> exit code, for the points ``todo`` of ``node``."""
        log.info("%s: %d points, %d at a time with %d thread(s) each", node.name, len(todo), self.jobs,
                 self.threads)
        futures: dict[int, Future] = {}
        for index in todo:
            label = _label(node, index)
            log.info("%s: queued", label)
            futures[index] = (self.executor().submit(_in_process, spec, index, label) if self.in_process
                              else self.executor().submit(_run_subprocess, exec_command(plan, node, index),
                                                          self.env))
        codes = {}
        for index, future in futures.items():
            try:
                codes[index] = future.result()
            except Exception:  # a worker that died (killed, out of memory) breaks the pool
                log.exception("%s: its worker process failed", _label(node, index))
                codes[index] = 1
                self.close()
        return codes

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None


def _label(node: Node, index: int) -> str:
    point = node.points[index]
    return f"{node.name}{f' [{point.name}]' if point.name else ''}"


def run_local(plan: Plan, dry_run: bool = False, env: Mapping[str, str] | None = None,
              in_process: bool = False, only: list[str] | None = None, jobs: int = 1) -> dict[str, Outcome]:
    """Every unfinished point in order, each as ``python -m pacx.reproduce exec`` (``in_process``: in this
    process, as ``python -m pacx.demo`` runs the demo); ``only``: just these nodes (the others are not
    looked at); ``jobs`` > 1: the points of ``local_parallel`` nodes run that many at a time, or the node's
    own number for ``local_parallel: k`` (:class:`PointPool`: the pool of ``jobs`` workers serves the whole
    plan, a pool of another width only its node)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    env = {**(env if env is not None else os.environ), "PACX_PYTHON": plan.python}
    unknown = sorted(set(only or ()) - set(plan.nodes))
    if unknown:
        raise ValueError(f"unknown node(s) {', '.join(unknown)}; the plan's nodes: {', '.join(plan.nodes)}")
    outcomes: dict[str, Outcome] = {}
    lines = [f"# plan {plan.name} ({plan.path}) -> {plan.out}, run locally in this order"]
    if not dry_run:
        write_specs(plan)
    selected = plan if not only else dataclasses.replace(
        plan, nodes={n: v for n, v in plan.nodes.items() if n in only})
    pools: dict[int, PointPool] = {}  # width -> pool
    try:
        for node, todo, outcome in _unfinished(selected, outcomes, lines):
            blocked = [p for p in node.after if p in outcomes and outcomes[p].status in ("failed", "blocked")]
            if blocked:
                outcome.status = "blocked"
                log.error("%s: not run, its parent(s) %s did not complete", node.name, ", ".join(blocked))
                continue
            start = time.perf_counter()
            spec = node_spec(plan, node) if in_process else None
            width = node.local_width(jobs)
            if width > 1 and len(todo) > 1 and not dry_run:
                if width not in pools:
                    pools[width] = PointPool(width, in_process, env)
                codes = pools[width].run(plan, node, spec, todo)
                if width != jobs:  # a node's own width: its workers are not needed after it
                    pools.pop(width).close()
            else:
                codes = {}
                for index in todo:
                    cmd, label = exec_command(plan, node, index), _label(node, index)
                    argv = node.points[index].argv
                    if dry_run:
                        lines += [f"# {label}: {node.target or 'python'} {shlex.join(argv)}", shlex.join(cmd)]
                        continue
                    log.info("%s: running", label)
                    codes[index] = (_in_process(spec, index, label) if in_process
                                    else _run_subprocess(cmd, env))
            for index, returncode in codes.items():
                if returncode != 0 or run_status(node.points[index].run_dir) != COMPLETED:
                    outcome.failed.append(index)
                    log.error("%s failed", _label(node, index))
            outcome.seconds = None if dry_run else round(time.perf_counter() - start, 1)
            outcome.status = "would run" if dry_run else "failed" if outcome.failed else "completed"
    finally:
        for pool in pools.values():
            pool.close()
    if dry_run:
        sys.stdout.write("\n".join(lines) + "\n")
    return outcomes


def _in_process(spec: dict, index: int, label: str) -> int:
    """One point in this process; an exception fails the point (logged), as it would end a subprocess."""
    try:
        return execute_point(spec, index, in_process=True)
    except SystemExit as done:  # a CLI's argument error, say
        return exit_code(done)
    except Exception:
        log.exception("%s raised", label)
        return 1


#: mode -> driver
DRIVERS: dict[str, Callable[..., dict[str, Outcome]]] = {"slurm": run_slurm, "local": run_local}


def summary(plan: Plan, mode: str, dry_run: bool, outcomes: dict[str, Outcome]) -> dict:
    nodes = {name: vars(o) for name, o in outcomes.items()}
    return {"plan": str(plan.path), "name": plan.name, "profile": plan.profile, "mode": mode,
            "dry_run": dry_run, "out": str(plan.out),
            "nodes": nodes, "job_ids": [o.job_id for o in outcomes.values() if o.status == "submitted"]}


def format_table(outcomes: dict[str, Outcome]) -> str:
    width = max(len(n) for n in outcomes)
    lines = [f"{'node':<{width}}  {'kind':<6} {'points':>6} {'pending':>7}  {'status':<12} job"]
    for name, o in outcomes.items():
        lines.append(f"{name:<{width}}  {o.kind:<6} {o.points:>6} {len(o.pending):>7}  {o.status:<12} "
                     f"{o.job_id or ''}")
    return "\n".join(lines)

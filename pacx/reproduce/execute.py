"""Running one node (or one grid point) of a plan: ``python -m pacx.reproduce exec NODE.json [--index I]``.

Both drivers go through here: ``scripts/slurm/node.sbatch`` runs it under ``srun`` (one process per task;
``--index $SLURM_ARRAY_TASK_ID`` for a grid), and ``--local`` runs it as a subprocess. ``NODE.json`` is
the node's spec, written by the driver from the plan (:func:`node_spec`).

* **stage** nodes call the Stage script's ``main(argv)`` in this process with the plan's arguments
  (``fit --config … --trainer <fragment> --trainer.default_root_dir <run_dir> --seed_everything …``),
  adding ``--ckpt_path last`` when the run directory holds ``checkpoints/last.ckpt`` from an earlier try —
  except in a requeued Slurm job (``SLURM_RESTART_COUNT`` > 0), where the Stage CLI resumes by itself.
  The Stage CLI writes ``run.json``; rank 0 checks that it ends ``completed``.
* **script** nodes run ``<python> <argv…>`` as a subprocess from the repository root, on rank 0 only,
  and this executor keeps ``<run_dir>/run.json`` (``running`` → ``completed`` or ``failed: …``).
  ``stdout`` (optional) sends the script's standard output to a file, written only if it succeeds.
  SIGTERM (time limit, ``scancel``) reaches the script and its failure is recorded; SIGUSR1 is ignored.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pacx.reproduce.plan import REPO, Node, Plan
from pacx.utils import git_sha, write_json_atomic

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"
COMPLETED = "completed"


def node_spec(plan: Plan, node: Node) -> dict:
    """What ``exec`` needs to run any point of ``node``, as JSON."""
    return {"plan": str(plan.path), "plan_name": plan.name, "node": node.name, "kind": node.kind,
            "stage": node.target, "python": plan.python, "repo": str(REPO), "axes": list(node.axes),
            "points": [p.to_dict() for p in node.points]}


def write_specs(plan: Plan) -> dict[str, Path]:
    """``<out>/.plan/nodes/<node>.json`` for every node; returns the paths."""
    paths = {}
    for node in plan.nodes.values():
        paths[node.name] = plan.spec_path(node.name)
        write_json_atomic(paths[node.name], node_spec(plan, node))
    return paths


def run_status(run_dir: str | Path) -> str | None:
    """The ``status`` in ``<run_dir>/run.json`` (None without a readable record)."""
    path = Path(run_dir) / RUN_RECORD
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None


def rank() -> int:
    """This process's global rank under srun (``SLURM_PROCID``) or a torch launcher (``RANK``); else 0."""
    return int(os.environ.get("SLURM_PROCID") or os.environ.get("RANK") or 0)


def requeued() -> bool:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def stage_argv(point: dict) -> list[str]:
    """The Stage CLI arguments of ``point``, resuming an interrupted run from its ``last.ckpt``."""
    argv = list(point["argv"])
    if (Path(point["run_dir"]) / "checkpoints" / "last.ckpt").is_file() and not requeued():
        argv += ["--ckpt_path", "last"]
    return argv


def run_stage_point(spec: dict, point: dict) -> int:
    if spec["repo"] not in sys.path:
        sys.path.insert(0, spec["repo"])  # the Stage scripts live in the repository root
    argv = stage_argv(point)
    log.info("%s%s: %s %s", spec["node"], f" [{point['name']}]" if point["name"] else "", spec["stage"], " ".join(argv))
    importlib.import_module(spec["stage"]).main(argv)
    if rank() != 0:
        return 0
    status = run_status(point["run_dir"])
    if status != COMPLETED:
        log.error("%s: %s/%s says status %r, not %r", spec["node"], point["run_dir"], RUN_RECORD, status, COMPLETED)
        return 1
    return 0


def run_script_point(spec: dict, point: dict) -> int:
    if rank() != 0:
        return 0  # a script runs once, whatever the number of tasks
    run_dir = Path(point["run_dir"])
    argv = [spec["python"], *point["argv"]]
    record = {"stage": "script", "node": spec["node"], "point": point["name"], "plan": spec["plan"],
              "run_dir": str(run_dir), "command": argv, "stdout": point["stdout"], "host": socket.gethostname(),
              "slurm_job": os.environ.get("SLURM_JOB_ID"), "git_sha": git_sha(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(run_dir / RUN_RECORD, {**record, "status": "running"})
    log.info("%s%s: %s", spec["node"], f" [{point['name']}]" if point["name"] else "", " ".join(argv))
    start = time.perf_counter()
    try:
        returncode = _run_script(argv, spec["repo"], point["stdout"])
        status = COMPLETED if returncode == 0 else f"failed: exit code {returncode}" if returncode > 0 \
            else f"failed: killed by {signal.Signals(-returncode).name}"
    except OSError as err:
        returncode, status = 1, f"failed: {err}"
    write_json_atomic(run_dir / RUN_RECORD, {**record, "status": status, "returncode": returncode,
                                             "seconds": round(time.perf_counter() - start, 1),
                                             "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if status != COMPLETED:
        log.error("%s: %s", spec["node"], status)
    return returncode if returncode >= 0 else 128 - returncode  # the shell's 128 + signal


def _wait(argv: list[str], cwd: str, stdout=None) -> int:
    """Run ``argv``; SIGTERM (Slurm's time limit, scancel) is passed on to it, so its failure gets recorded.
    SIGUSR1 (the Stage CLIs' checkpoint-and-requeue warning, ``--signal=USR1@90``) is ignored by both: a
    script has nothing to checkpoint and runs until the limit."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    procs: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: [p.terminate() for p in procs])
    try:
        procs.append(subprocess.Popen(argv, cwd=cwd, stdout=stdout))
        return procs[0].wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_script(argv: list[str], cwd: str, stdout: str | None) -> int:
    if stdout is None:
        return _wait(argv, cwd)
    out = Path(stdout)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        returncode = _wait(argv, cwd, f)
    if returncode == 0:
        os.replace(tmp, out)
    else:
        tmp.unlink()
    return returncode


#: node kind -> how one of its points runs
RUNNERS: dict[str, Callable[[dict, dict], int]] = {"stage": run_stage_point, "script": run_script_point}


def execute(spec_path: str | Path, index: int | None = None) -> int:
    """Run point ``index`` of the node in ``spec_path`` (a node without a grid: its only point); the exit code."""
    spec = json.loads(Path(spec_path).read_text())
    points = spec["points"]
    if index is None:
        if len(points) != 1:
            raise SystemExit(f"{spec_path}: node {spec['node']!r} is a grid of {len(points)} points: pass --index")
        index = 0
    if not 0 <= index < len(points):
        raise SystemExit(f"{spec_path}: --index {index} out of range (node {spec['node']!r} has {len(points)} points)")
    return RUNNERS[spec["kind"]](spec, points[index])

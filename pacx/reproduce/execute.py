"""Running one point of a plan: ``python -m pacx.reproduce exec NODE.json [--index I]`` (docs/plans.md).

Stage points call the Stage script's ``main(argv)`` in this process and check the ``run.json`` it writes;
script points run ``<python> argv…`` (a subprocess, or ``runpy`` in process) on rank 0 only and keep their
own ``run.json``. SIGTERM reaches a script subprocess and its failure is recorded; SIGUSR1 is ignored.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from pacx.progress import progress_enabled
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
    """The Stage CLI arguments of ``point``, resuming an interrupted run from its ``last.ckpt``; without a
    terminal (a Slurm log) or with ``PACX_PROGRESS=0`` the Lightning bars are off, else the config decides."""
    argv = list(point["argv"])
    if not progress_enabled():
        argv += ["--trainer.enable_progress_bar", "false"]
    if (Path(point["run_dir"]) / "checkpoints" / "last.ckpt").is_file() and not requeued():
        argv += ["--ckpt_path", "last"]
    return argv


def run_stage_point(spec: dict, point: dict, in_process: bool = True) -> int:
    """A Stage point, always in this process (``<Stage>.main(argv)``); rank 0 checks its ``run.json``."""
    if spec["repo"] not in sys.path:
        sys.path.insert(0, spec["repo"])  # the Stage scripts live in the repository root
    argv = stage_argv(point)
    log.info("%s%s: %s %s", spec["node"], f" [{point['name']}]" if point["name"] else "", spec["stage"],
             " ".join(argv))
    importlib.import_module(spec["stage"]).main(argv)
    if rank() != 0:
        return 0
    status = run_status(point["run_dir"])
    if status != COMPLETED:
        log.error("%s: %s/%s says status %r, not %r", spec["node"], point["run_dir"], RUN_RECORD, status,
                  COMPLETED)
        return 1
    return 0


def run_script_point(spec: dict, point: dict, in_process: bool = False) -> int:
    if rank() != 0:
        return 0  # a script runs once, whatever the number of tasks
    run_dir = Path(point["run_dir"])
    argv = [spec["python"], *point["argv"]]
    record = {"stage": "script", "node": spec["node"], "point": point["name"], "plan": spec["plan"],
              "run_dir": str(run_dir), "command": argv, "stdout": point["stdout"],
              "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID"), "git_sha": git_sha(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(run_dir / RUN_RECORD, {**record, "status": "running"})
    log.info("%s%s: %s", spec["node"], f" [{point['name']}]" if point["name"] else "", " ".join(argv))
    start = time.perf_counter()
    try:
        returncode = (_run_in_process if in_process else _run_script)(argv, spec["repo"], point["stdout"])
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


def _with_stdout(run: Callable, argv: list[str], cwd: str, stdout: str | None) -> int:
    """``run(argv, cwd, file)`` with the standard output sent to ``stdout`` (None: left alone), which is
    written only if it succeeds (exit code 0)."""
    if stdout is None:
        return run(argv, cwd, None)
    out = Path(stdout)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    returncode = 1  # an interpreter that cannot start raises: its file goes too
    try:
        with open(tmp, "w") as f:
            returncode = run(argv, cwd, f)
    finally:
        if returncode == 0:
            os.replace(tmp, out)
        else:
            tmp.unlink(missing_ok=True)
    return returncode


def exit_code(done: SystemExit) -> int:
    """The process exit status ``raise SystemExit(code)`` stands for (None: 0, a message: 1)."""
    # as the operating system keeps it: SystemExit(-1) is 255, not a signal
    return done.code % 256 if isinstance(done.code, int) else 0 if done.code is None else 1


def _run_script(argv: list[str], cwd: str, stdout: str | None) -> int:
    return _with_stdout(_wait, argv, cwd, stdout)


def _runpy(argv: list[str], cwd: str, stdout=None) -> int:
    """``<python> argv…`` inside this process (a script path, ``-m module`` or ``-c code``), from ``cwd``; the
    exit code (an exception is logged and gives 1, as the subprocess would exit)."""
    option = argv[1] if argv[1] in ("-m", "-c") else None
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    try:
        os.chdir(cwd)
        sys.argv = [argv[2] if option == "-m" else "-c", *argv[3:]] if option else argv[1:]
        with contextlib.redirect_stdout(stdout) if stdout else contextlib.nullcontext():
            if option == "-m":
                # a module this process imported before runs afresh, as intended
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
            elif option == "-c":
                exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__"})
            else:
                runpy.run_path(argv[1], run_name="__main__")
        return 0
    except SystemExit as done:
        return exit_code(done)
    except Exception:
        log.exception("%s failed", " ".join(argv[1:]))
        return 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)


def _run_in_process(argv: list[str], cwd: str, stdout: str | None) -> int:
    return _with_stdout(_runpy, argv, cwd, stdout)


#: node kind -> how one of its points runs
RUNNERS: dict[str, Callable[[dict, dict, bool], int]] = {"stage": run_stage_point, "script": run_script_point}


def execute_point(spec: dict, index: int, in_process: bool = False) -> int:
    """Run point ``index`` of the node ``spec`` (:func:`node_spec`); ``in_process``: scripts too run in this
    process (the local driver's in-process mode; Stage points always do)."""
    return RUNNERS[spec["kind"]](spec, spec["points"][index], in_process)


def execute(spec_path: str | Path, index: int | None = None) -> int:
    """Run point ``index`` of the node in ``spec_path`` (a node without a grid: its only point); the exit
    code."""
    spec = json.loads(Path(spec_path).read_text())
    points = spec["points"]
    if index is None:
        if len(points) != 1:
            raise SystemExit(f"{spec_path}: node {spec['node']!r} is a grid of {len(points)} points: "
                             "pass --index")
        index = 0
    if not 0 <= index < len(points):
        raise SystemExit(f"{spec_path}: --index {index} out of range "
                         f"(node {spec['node']!r} has {len(points)} points)")
    return execute_point(spec, index)

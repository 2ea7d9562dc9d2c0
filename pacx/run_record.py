"""Reading a run directory's ``run.json`` (written by :class:`pacx.lit.callbacks.RunRecord`); Lightning-free.

    python -m pacx.run_record RUN_DIR [RUN_DIR ...]    # prints stage, status (live), attempt, debug flags

A record that says ``running`` but names a process on this host that no longer exists reads as ``killed``:
``kill -9`` and the out-of-memory killer leave the file unchanged (docs/design.md#run-record).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

RUN_JSON = "run.json"
RUNNING = "running"
KILLED = "killed"
FIT_LOCK = ".fit.lock"


class RunLockedError(RuntimeError):
    """Another process is training the same run directory."""


@contextlib.contextmanager
def fit_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``<run_dir>/.fit.lock`` while a ``fit`` trains the run: a second ``fit`` of the same directory
    (a resume started while the first still runs, the same command sent twice) raises
    :class:`RunLockedError` naming the holder, instead of both writing ``last.ckpt`` and the logs.

    An advisory ``flock`` on the file, which the kernel drops when the holding process ends in any way
    (``kill -9``, the out-of-memory killer, a preempted SLURM job): a crashed run never leaves a stale lock
    behind. On a network file system without ``flock`` support the lock is not shared between hosts."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FIT_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "an unknown process"
            raise RunLockedError(f"{run_dir} is being trained by another fit ({holder}, lock {path}): two "
                                 "fits of one run directory overwrite each other's checkpoints. Wait for it "
                                 "to end, or stop it, then resume with --ckpt_path last") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # the holder is gone: an ended run's lock file is empty
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: a zombie has exited already
        # the name in parentheses may hold ") " itself: the state follows the last one
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def live_status(record: dict) -> str | None:
    """The record's status, with ``running`` turned into ``killed`` when its process on this host is gone."""
    status = record.get("status")
    pid, host = record.get("pid"), record.get("host")
    if status == RUNNING and isinstance(pid, int) and host == socket.gethostname() and not process_alive(pid):
        return KILLED
    return status


def read_run_record(run_dir: str | Path) -> dict:
    """``<run_dir>/run.json`` as a dict, with the live status (see the module docstring). Missing: ``{}``."""
    path = Path(run_dir) / RUN_JSON
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: cannot parse: {err}") from err
    if live_status(record) != record.get("status"):
        record = {**record, "status": live_status(record), "recorded_status": record.get("status")}
    return record


def main(argv: list[str] | None = None) -> int:
    dirs = sys.argv[1:] if argv is None else argv
    if not dirs:
        sys.stderr.write("usage: python -m pacx.run_record RUN_DIR [RUN_DIR ...]\n")
        return 2
    for run_dir in dirs:
        record = read_run_record(run_dir)
        if not record:
            sys.stdout.write(f"{run_dir}: no {RUN_JSON}\n")
            continue
        debug = record.get("debug") or {}
        sys.stdout.write(f"{run_dir}: {record.get('stage')} {record.get('status')} (attempt "
                         f"{record.get('attempt')}, step "
                         f"{record.get('global_step')}){' DEBUG ' + json.dumps(debug) if debug else ''}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

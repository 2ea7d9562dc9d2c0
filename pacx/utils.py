"""Small helpers without a better home: git revision, atomic writes, portable source references."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np


def cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def git_sha() -> str:
    """The commit of the pacx checkout in use ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
            timeout=10, check=True,
        )
        sha = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json_atomic(path: str | Path, obj: object) -> None:
    """Write JSON via a temporary file and a rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text via a temporary file and a rename (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def save_npy_atomic(path: str | Path, array) -> Path:
    """``np.save`` via a temporary file and a rename (no pickles), so readers never see a partial array."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)
    os.replace(tmp, path)
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def portable_source(path: str | Path) -> dict[str, str]:
    """How an exported file names the file it was made from, without any absolute path (nothing of the
    exporting machine leaks): ``source`` is the path inside its run directory (the nearest parent with a
    ``run.json``, e.g. ``checkpoints/last.ckpt``) or else the file name; ``source_run`` is that run
    directory's name; ``source_sha256`` identifies the file's content."""
    path = Path(path).resolve()
    out = {"source": path.name, "source_sha256": file_sha256(path)}
    for parent in path.parents:
        if (parent / "run.json").is_file():
            out.update(source=path.relative_to(parent).as_posix(), source_run=parent.name)
            break
    return out

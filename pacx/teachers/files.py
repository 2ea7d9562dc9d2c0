"""Teacher feature files on disk (:mod:`pacx.teachers.extract`): rows read through short-lived memory
maps, and float32 [N, D] outputs written atomically.

``read_rows`` unmaps after copying, so the pages read do not stay resident (a 2.4 GB ECG array would otherwise
grow peak RSS to its size). ``write_features_atomic`` fills ``.<name>.tmp<pid>`` next to the output and
renames it after an ``fsync``: never a truncated file at the final name (stale temporaries go on restart).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pacx.data.symile_files import SymileFileError, open_npy
from pacx.progress import progress as progress_bar
from pacx.run_record import process_alive

log = logging.getLogger(__name__)


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a ``.npy`` file as an in-memory copy, through a short-lived memory map.

    The map is dropped before returning, so the pages read do not stay resident in this process
    (they remain in the OS page cache, which is not the process's memory).
    """
    arr = open_npy(path)
    try:
        return np.array(arr[start:stop])
    finally:
        del arr  # unmaps: nothing else references the mapping


def n_rows(path: Path) -> int:
    return len(open_npy(path))  # the map is dropped with the temporary


@dataclass(frozen=True)
class FeatureFile:
    """What happened to one output file: ``status`` is ``written`` or ``skipped``."""

    split: str
    key: str
    path: Path
    shape: tuple[int, int]
    status: str
    seconds: float = 0.0


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_temps(path: Path) -> None:
    """Delete temporary files of ``path`` left by killed runs (their process no longer exists)."""
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            log.info("removing %s, left by an interrupted run (process %s)", tmp, pid)
            tmp.unlink(missing_ok=True)


def existing_matches(path: Path, shape: tuple[int, int]) -> bool:
    """Whether ``path`` already holds a float32 array of ``shape`` (a wrong one is logged)."""
    if not path.is_file():
        return False
    try:
        arr = open_npy(path)
        got = (tuple(arr.shape), arr.dtype.name)
        del arr
    except SymileFileError as err:
        log.warning("%s is unreadable and will be rewritten: %s", path, err)
        return False
    if got != (shape, "float32"):
        log.warning("%s holds %s %s, expected float32 %s: it will be rewritten", path, got[1], list(got[0]),
                    list(shape))
        return False
    return True


def write_features_atomic(
    path: Path,
    n: int,
    dim: int,
    batch_fn: Callable[[int, int], np.ndarray],
    batch_size: int,
    desc: str = "",
    progress: bool = True,
) -> None:
    """Fill float32 [n, dim] at ``path`` from ``batch_fn(start, stop)``, batch by batch, atomically.

    Rows are written into a memory-mapped temporary file next to ``path``; the file is flushed, synced
    and renamed onto ``path`` only when every row is in. Any exception (including KeyboardInterrupt)
    removes the temporary file and leaves ``path`` as it was.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    remove_stale_temps(path)
    tmp = _temp_path(path)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        for start in progress_bar(range(0, n, batch_size), desc=desc, unit="batch", enabled=progress):
            stop = min(start + batch_size, n)
            feats = batch_fn(start, stop)  # [stop - start, dim]
            if feats.shape != (stop - start, dim):
                raise RuntimeError(f"{desc}: rows {start}:{stop} gave features of shape {list(feats.shape)}, "
                                   f"expected {[stop - start, dim]}")
            if not np.isfinite(feats).all():
                raise FloatingPointError(f"{desc}: non-finite features in rows {start}:{stop}")
            out[start:stop] = feats
        out.flush()
        del out
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""Progress bars for the long loops (converters, image cache, teacher features, phantom, demo), all alike.

:func:`progress` is a ``tqdm`` bar on stderr that stays silent when stderr is not a terminal (log files,
pipes, pytest) or when bars are switched off: by :func:`set_progress` (what every ``--no-progress`` flag
calls, for its whole process) or by ``PACX_PROGRESS=0`` in the environment (inherited by subprocesses).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import tqdm

ENV_VAR = "PACX_PROGRESS"
NO_PROGRESS_HELP = ("no progress bars (they are off anyway when stderr is not a terminal, or with "
                    "PACX_PROGRESS=0)")
_switched_on = True


def set_progress(enabled: bool) -> None:
    """Switch every bar of this process on or off."""
    global _switched_on
    _switched_on = bool(enabled)


def progress_switched_on() -> bool:
    """What :func:`set_progress` last set (True unless switched off): handed on to worker processes."""
    return _switched_on


def progress_enabled() -> bool:
    """Whether a bar shows now: switched on, ``PACX_PROGRESS`` is not ``0`` and stderr is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)  # sys.stderr may be None (pythonw) or a capture object
    return _switched_on and os.environ.get(ENV_VAR, "1").strip() != "0" and bool(isatty and isatty())


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
             unit: str = "it", enabled: bool = True, **kwargs) -> tqdm:
    """``tqdm(iterable, ...)``, disabled unless :func:`progress_enabled` and ``enabled`` (a caller's own
    switch).

    A disabled bar passes the items through and ignores ``update``/``close``, so call sites need no branch.
    """
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not (enabled and progress_enabled()),
                **kwargs)

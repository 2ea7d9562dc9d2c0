"""Debug runs: which Lightning flags make a run one, and the one check that keeps them out of results.

A run with ``fast_dev_run``, ``overfit_batches`` or any ``limit_*_batches`` below the full data is marked in
``run.json``, checkpoints, exports and results rows (docs/method.md#runs). :func:`check_not_debug` is the
readers' refusal, lifted by :func:`allow_debug_runs` or ``PACX_ALLOW_DEBUG=1`` (docs/design.md#debug-runs).
This module imports neither Lightning nor torch: it reads a trainer's attributes by name.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: Trainer attribute -> the value that means "not a debug run" (a ``limit_*`` given as an int is a batch
#: count, so it always marks a debug run; as a float it is a fraction of the data).
DEBUG_FLAGS: dict[str, float] = {
    "fast_dev_run": 0,
    "overfit_batches": 0.0,
    "limit_train_batches": 1.0,
    "limit_val_batches": 1.0,
    "limit_test_batches": 1.0,
    "limit_predict_batches": 1.0,
}
# The limits fast_dev_run and overfit_batches set themselves; recording those too would only repeat them
# (overfit_batches sets only the train and val limits: a test or predict limit beside it is the user's own).
_IMPLIES_LIMITS: dict[str, tuple[str, ...]] = {
    "fast_dev_run": ("limit_train_batches", "limit_val_batches", "limit_test_batches",
                     "limit_predict_batches"),
    "overfit_batches": ("limit_train_batches", "limit_val_batches"),
}

ALLOW_ENV = "PACX_ALLOW_DEBUG"
#: Set by the run that was allowed a debug input (:func:`allow_debug_runs` + :func:`check_not_debug`).
FROM_DEBUG_RUN = "from_debug_run"

_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("pacx_allow_debug", default=False)


@dataclass
class DebugInputs:
    """What :func:`check_not_debug` saw inside an :func:`allow_debug_runs` block."""

    let_through: list[str] = field(default_factory=list)  # debug inputs allowed in
    # errors raised (a caller may have wrapped them)
    refused: list[DebugRunError] = field(default_factory=list)


_SEEN: contextvars.ContextVar[DebugInputs | None] = contextvars.ContextVar("pacx_debug_inputs", default=None)


class DebugRunError(RuntimeError):
    """A debug run was given where real results or weights are needed."""


def debug_flags(trainer) -> dict[str, float | int]:
    """The debug flags ``trainer`` runs with (empty for a normal run), e.g. ``{"limit_test_batches": 2}``."""
    found = {}
    for name, normal in DEBUG_FLAGS.items():
        value = getattr(trainer, name, normal)
        if value is None or isinstance(value, bool) and not value:
            continue
        if isinstance(value, bool):
            found[name] = int(value)
        elif name.startswith("limit_") and isinstance(value, int):
            # an int limit is a batch count (Lightning): even 1 means one batch, not 100 %
            found[name] = value
        elif isinstance(value, (int, float)) and float(value) != float(normal):
            found[name] = value
    implied = {limit for flag, limits in _IMPLIES_LIMITS.items() if flag in found for limit in limits}
    found = {k: v for k, v in found.items() if k not in implied}
    return found


def merge_flags(*flag_sets: Mapping | None) -> dict:
    """The union of several flag dicts (an earlier attempt's flags stay when a later attempt has none)."""
    out: dict = {}
    for flags in flag_sets:
        out.update(flags or {})
    return out


def describe(flags: Mapping) -> str:
    """``{"fast_dev_run": 1}`` -> ``"fast_dev_run=1"``: the compact form written into results rows."""
    return ",".join(f"{k}={v}" for k, v in sorted(flags.items()))


def is_debug_row(value) -> bool:
    """Whether a results row's ``debug`` cell marks a debug run (blank, NaN and None do not)."""
    return not (value is None or value != value or not str(value).strip())


@contextlib.contextmanager
def allow_debug_runs(allow: bool = True) -> Iterator[DebugInputs]:
    """Within the block, :func:`check_not_debug` lets debug runs through if ``allow`` (the CLIs'
    ``--allow_debug``). Yields a :class:`DebugInputs`: what was let through (a run that used any of it is a
    debug run itself) and what was refused."""
    seen = DebugInputs()
    tokens = (_ALLOWED.set(bool(allow)), _SEEN.set(seen))
    try:
        yield seen
    finally:
        _SEEN.reset(tokens[1])
        _ALLOWED.reset(tokens[0])


def debug_allowed() -> bool:
    """Inside :func:`allow_debug_runs` (``--allow_debug true``), or with ``PACX_ALLOW_DEBUG=1`` set."""
    return _ALLOWED.get() or os.environ.get(ALLOW_ENV, "").lower() in ("1", "true", "yes")


def check_not_debug(flags: Mapping | None, what: str, allow: bool | None = None) -> None:
    """Raise :class:`DebugRunError` if ``flags`` mark a debug run, unless allowed (argument or context)."""
    if not flags:
        return
    seen = _SEEN.get()
    if allow if allow is not None else debug_allowed():
        log.warning("%s comes from a debug run (%s); allowed, and marked as %s", what, describe(flags),
                    FROM_DEBUG_RUN)
        if seen is not None:
            seen.let_through.append(what)
        return
    error = DebugRunError(
        f"{what} comes from a debug run ({describe(flags)}): its weights and metrics are not a real result. "
        "Use a full run, or allow it explicitly: --allow_debug true (Stage CLIs), "
        f"pacx.load_encoder(..., allow_debug=True), scripts/make_tables.py --allow-debug, or {ALLOW_ENV}=1"
    )
    if seen is not None:
        seen.refused.append(error)
    raise error

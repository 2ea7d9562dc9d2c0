"""Run history that survives resumes: a CSV logger that appends instead of deleting (docs/method.md#runs).

:class:`HistoryCSVLogger` keeps ``<run_dir>/metrics.csv`` across attempts (Lightning's ``CSVLogger`` deletes
it when it starts), each row tagged with the ``attempt`` of ``run.json`` (:func:`next_attempt`). ``validate``
/ ``test`` / ``predict`` into a run directory log under ``<run_dir>/<subcommand>/`` (:func:`log_location`),
never into the training log. Details: docs/design.md#history.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from pacx.run_record import read_run_record

ATTEMPT_COLUMN = "attempt"


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer minus the deletion, plus an ``attempt`` column."""

    def __init__(self, log_dir: str, attempt: int) -> None:
        self.attempt = attempt
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        """Called by the parent's ``__init__``: adopt the existing file's header instead of deleting it."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        self.metrics[-1][ATTEMPT_COLUMN] = self.attempt


class HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<save_dir>/<version>/metrics.csv`` by appending, each row tagged
    ``attempt``."""

    def __init__(self, save_dir: str | Path, version: str = "", attempt: int = 1,
                 flush_logs_every_n_steps: int = 100) -> None:
        super().__init__(save_dir=save_dir, name="", version=version,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.attempt = attempt

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self.attempt)
        return self._experiment


def next_attempt(run_dir: str | Path) -> int:
    """The number of the ``fit`` attempt about to start in ``run_dir``: 1 for a new run, else the last
    recorded attempt + 1 (a ``run.json`` from before attempts were recorded counts as attempt 1)."""
    record = read_run_record(run_dir)
    if not record:
        return 1
    return int(record.get("attempt") or 1) + 1


def log_location(subcommand: str) -> str:
    """The CSV logger's version folder inside the run directory: ``""`` (the run directory itself) for
    ``fit``, the subcommand's name for ``validate`` / ``test`` / ``predict``."""
    return "" if subcommand == "fit" else subcommand

"""The teachers' training command: the shared CLI (:mod:`pacx.cli`) on any
:class:`~pacx.lit.common.TeacherModule` and :class:`~pacx.data.symile.SymileMIMICDataModule`, run as
``python -m pacx.teachers fit --config configs/teachers/labs_dae.yaml --data.root DIR`` or as
``stage: pacx/teacher_cli.py`` in a plan. :func:`names_teacher` lets ``Stage2_PACX.py`` forward a teacher
config here (with a ``FutureWarning``, for one release).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from pacx.cli import cli_main
from pacx.data.symile import SymileMIMICDataModule
from pacx.lit.common import TeacherModule

#: the modules that define the teacher LightningModules (for bare class names on the command line)
TEACHER_LIT_MODULES = ("pacx.lit.labs_dae", "pacx.lit.ecg_ssl")


def main(args: list[str] | None = None):
    return cli_main(TeacherModule, SymileMIMICDataModule, args=args, program="pacx.teachers",
                    subclass_mode_model=True)


def _model_class_paths(args: Sequence[str]) -> list[str]:
    """The ``model`` class paths named in ``args``: by each ``--config`` file (``model.class_path``) and by
    ``--model`` / ``--model.class_path``, in order (the last one wins, as in the CLI)."""
    found, args = [], list(args)
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        if key == "--config" and Path(value).is_file():
            model = (yaml.safe_load(Path(value).read_text()) or {}).get("model")
            if isinstance(model, dict) and model.get("class_path"):
                found.append(str(model["class_path"]))
        elif key in ("--model", "--model.class_path") and re.fullmatch(r"[A-Za-z_][\w.]*", value):
            found.append(value)
    return found


def _is_teacher(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    for candidate in ([module] if module else TEACHER_LIT_MODULES):
        try:
            cls = getattr(importlib.import_module(candidate), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, TeacherModule):
            return True
    return False


def names_teacher(args: Sequence[str]) -> bool:
    """Whether ``args`` (a Stage CLI command line) train a :class:`~pacx.lit.common.TeacherModule`."""
    paths = _model_class_paths(args)
    return bool(paths) and _is_teacher(paths[-1])


if __name__ == "__main__":
    main()

"""Old module paths kept for one release (0.1.x): each is an alias of its new module, with a warning.

Issue 14 renamed ``pacx.benchmark`` -> :mod:`pacx.perf.train`, ``pacx.data.benchmarks`` ->
:mod:`pacx.data.converters`, ``pacx.data.benchmark_dm`` -> :mod:`pacx.data.stage3` and ``pacx.data.phantom``
-> :mod:`pacx.demo.phantom`. Each old module is one :func:`alias_module` call, so old imports and saved
``class_path`` entries give the very same objects; delete them with this file in the next release.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping


def alias_module(old: str, new: str, submodules: tuple[str, ...] = ()) -> None:
    """Make ``old`` (and ``old.<sub>`` for each of ``submodules``) the same module objects as ``new``, warning
    with a ``DeprecationWarning`` that names the new path. Called from the old module's body."""
    warnings.warn(f"{old} has moved to {new}; the old name will be removed in the next release",
                  DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    for sub in submodules:
        child = importlib.import_module(f"{new}.{sub}")
        sys.modules[f"{old}.{sub}"] = child
        setattr(module, sub, child)
    sys.modules[old] = module


def moved_names(old: str, homes: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``old``, a module split in several: each name of ``homes`` (name -> its
    new module) resolves to that module's object, with a ``DeprecationWarning`` that names the new path."""

    def __getattr__(name: str) -> object:
        if name not in homes:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} has moved to {homes[name]}.{name}; the old name will be removed in the "
                      "next release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(homes[name]), name)

    return __getattr__

"""Old module paths kept for one release (0.1.x): each is an alias of its new module, with a warning.

Issue 14 renamed ``pacx.benchmark`` -> :mod:`pacx.perf.train`, ``pacx.data.benchmarks`` ->
:mod:`pacx.data.converters`, ``pacx.data.benchmark_dm`` -> :mod:`pacx.data.stage3` and
``pacx.data.phantom`` -> :mod:`pacx.demo.phantom`. The old modules are one :func:`alias_module` call each,
so ``import`` and ``from ... import`` of the old names (and ``class_path`` entries in saved configs) give
the very same module objects and classes; delete them with this file in the next release.
"""

from __future__ import annotations

import importlib
import sys
import warnings


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

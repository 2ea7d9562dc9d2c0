"""Converter registry behind ``scripts/prepare.py``: official release -> pacx manifests.

One entry per dataset. A converter reads the release's own metadata files (it never
opens images), writes split CSVs into ``out`` and returns a summary of what it wrote, which
:func:`run_converter` keeps in ``<out>/prepare.json``. Each entry declares its extra command-line options,
so the CLI needs no per-dataset branches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ConverterOption:
    flag: str  # e.g. "--frontal-only"
    help: str
    is_flag: bool = True
    default: object = None


@dataclass(frozen=True)
class Converter:
    name: str
    task: str  # mae | binary | multiclass | multilabel | segmentation | ...
    metric: str
    description: str
    fn: Callable[..., dict]  # fn(raw: Path, out: Path, **options) -> summary dict
    options: tuple[ConverterOption, ...] = field(default_factory=tuple)


CONVERTERS: dict[str, Converter] = {}


def register_converter(name: str, task: str, metric: str, description: str,
                       options: tuple[ConverterOption, ...] = ()):
    def deco(fn):
        if name in CONVERTERS:
            raise KeyError(f"converter {name!r} registered twice")
        CONVERTERS[name] = Converter(name, task, metric, description, fn, tuple(options))
        return fn

    return deco


def load_builtin_converters() -> dict[str, Converter]:
    """Import the modules that register converters (kept out of import time of this module)."""
    import pacx.data.chexpert  # noqa: F401
    import pacx.data.converters.classification  # noqa: F401
    import pacx.data.converters.medmod  # noqa: F401
    import pacx.data.converters.segmentation  # noqa: F401

    return CONVERTERS


SIDECAR = "prepare.json"


def run_converter(name: str, raw: str | Path, out: str | Path, **options) -> dict:
    """Run one converter and keep what it did beside the manifests: ``<out>/prepare.json`` (dataset, release
    folder, options, the returned summary, git revision)."""
    from pacx.utils import git_sha, write_json_atomic

    converters = load_builtin_converters()
    if name not in converters:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(converters)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = converters[name].fn(Path(raw), out, **options)
    write_json_atomic(out / SIDECAR, {"dataset": name, "raw": str(raw), "options": options, "summary": summary,
                                      "git_sha": git_sha()})
    return summary

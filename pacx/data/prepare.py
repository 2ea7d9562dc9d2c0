"""Converter registry behind ``scripts/prepare.py``: official release -> pacx manifests.

One entry per dataset. A converter reads the release's own metadata files (it never
opens images), writes split CSVs into ``out`` and returns a summary of what it wrote, which
:func:`run_converter` keeps in ``<out>/prepare.json``. Each entry declares its extra command-line options,
so the CLI needs no per-dataset branches.
"""

from __future__ import annotations

from pathlib import Path

from pacx.data import chexpert
from pacx.data.converters import classification, medmod, segmentation
from pacx.data.converters.base import Converter, ConverterOption
from pacx.utils import git_sha, write_json_atomic


def _by_name(converters: list[Converter]) -> dict[str, Converter]:
    table: dict[str, Converter] = {}
    for conv in converters:
        if conv.name in table:
            raise KeyError(f"converter {conv.name!r} registered twice")
        table[conv.name] = conv
    return table


# name -> converter: the built-in ones are the tables of the modules that define them; register_converter
# adds one at run time
CONVERTERS: dict[str, Converter] = _by_name([
    *chexpert.CONVERTERS, *classification.CONVERTERS, *medmod.CONVERTERS, *segmentation.CONVERTERS,
])


def register_converter(name: str, task: str, metric: str, description: str,
                       options: tuple[ConverterOption, ...] = ()):
    """Decorator: add the function to ``CONVERTERS`` as converter ``name`` (a benchmark of your own)."""

    def deco(fn):
        if name in CONVERTERS:
            raise KeyError(f"converter {name!r} registered twice")
        CONVERTERS[name] = Converter(name, task, metric, description, fn, tuple(options))
        return fn

    return deco


SIDECAR = "prepare.json"


def run_converter(name: str, raw: str | Path, out: str | Path, **options) -> dict:
    """Run one converter and keep what it did beside the manifests: ``<out>/prepare.json`` (dataset, release
    folder, options, the returned summary, git revision)."""
    if name not in CONVERTERS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(CONVERTERS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = CONVERTERS[name].fn(Path(raw), out, **options)
    write_json_atomic(out / SIDECAR, {"dataset": name, "raw": str(raw), "options": options,
                                      "summary": summary, "git_sha": git_sha()})
    return summary

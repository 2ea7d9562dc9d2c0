"""What a converter is (official release -> pacx manifests; docs/architecture.md#add-a-benchmark): its
command-line options, its entry, and :func:`converter`, the decorator that adds a function to the
``CONVERTERS`` table of the module defining it. :mod:`pacx.data.prepare` gathers those tables by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


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


def converter(table: list[Converter], name: str, task: str, metric: str, description: str,
              options: tuple[ConverterOption, ...] = ()):
    """Decorator: append the function to ``table`` (its module's ``CONVERTERS``) as converter ``name``; the
    function itself is returned unchanged."""

    def deco(fn: Callable[..., dict]) -> Callable[..., dict]:
        table.append(Converter(name, task, metric, description, fn, tuple(options)))
        return fn

    return deco

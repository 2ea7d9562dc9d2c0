"""Deprecated: moved to :mod:`pacx.perf.train` (:mod:`pacx.deprecated`)."""

from pacx.deprecated import alias_module

alias_module(__name__, "pacx.perf.train")

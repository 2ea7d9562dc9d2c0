"""Deprecated: moved to :mod:`pacx.data.stage3` (:mod:`pacx.deprecated`)."""

from pacx.deprecated import alias_module

alias_module(__name__, "pacx.data.stage3")

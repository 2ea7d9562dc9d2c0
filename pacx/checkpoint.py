"""Deprecated: moved to :mod:`pacx.weights.checkpoint` (:mod:`pacx.deprecated`)."""

from pacx.deprecated import alias_module

alias_module(__name__, "pacx.weights.checkpoint")

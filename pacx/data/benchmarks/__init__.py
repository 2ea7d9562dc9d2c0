"""Deprecated: moved to :mod:`pacx.data.converters` (:mod:`pacx.deprecated`)."""

from pacx.deprecated import alias_module

alias_module(__name__, "pacx.data.converters", ("classification", "medmod", "segmentation"))

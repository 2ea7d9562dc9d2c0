"""Deprecated: moved to :mod:`pacx.teacher_cli` (:mod:`pacx.deprecated`)."""

from pacx.deprecated import alias_module

alias_module(__name__, "pacx.teacher_cli")

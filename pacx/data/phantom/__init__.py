"""Deprecated: moved to :mod:`pacx.demo.phantom`; ``python -m pacx.data.phantom`` still runs
``python -m pacx.demo.phantom`` (:mod:`pacx.deprecated`)."""

from pacx.deprecated import alias_module

alias_module(__name__, "pacx.demo.phantom",
             ("anatomy", "cxr", "generate", "grid", "latent", "physio", "releases"))

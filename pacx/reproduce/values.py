"""The values of a plan: ``{name}`` fields, vars (strings or lists), argument lists and profiles as read
from the YAML. Validation of the graph itself is :mod:`pacx.reproduce.plan`; the format is documented in
:mod:`pacx.reproduce`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the Stage scripts, configs/ and scripts/ live here
BUILTINS = ("out", "node", "point", "run_dir", "profile")  # names every string may use besides vars and axes
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*$")
_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WHOLE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}$")
FOR_KEYS = {"for", "in", "args"}

#: a plan's values: strings, and list vars (only usable as a grid axis or a ``for`` argument group)
Values = Mapping[str, "str | list[str]"]


class PlanError(ValueError):
    """A plan that cannot run; the message names the plan file and the node."""


def text(value) -> str:
    """A YAML scalar as a command-line word (booleans as the CLIs spell them)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, int, float)):
        return str(value)
    raise TypeError(f"expected a string or number, got {type(value).__name__} {value!r}")


def substitute(template, values: Values, where: str) -> str:
    """``{name}`` → ``values[name]``; ``{{`` / ``}}`` are literal braces. Anything else in braces (a Python
    dict in ``-c`` code, say) is left alone."""

    def replace(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        name = m.group(1)
        if name not in values:
            raise PlanError(f"{where}: unknown field {{{name}}} in {template!r}; "
                            f"defined: {', '.join(sorted(values))}")
        if isinstance(values[name], list):
            raise PlanError(f"{where}: {{{name}}} is a list var; use it as a grid axis "
                            f"(axis: \"{{{name}}}\") or in a `for` argument group, not inside {template!r}")
        return values[name]

    try:
        return _FIELD.sub(replace, text(template))
    except TypeError as err:
        raise PlanError(f"{where}: {err}") from None


def list_var(template, values: Values) -> list[str] | None:
    """The list of a list var when ``template`` is exactly ``"{name}"`` naming one; else None."""
    match = _WHOLE_FIELD.match(template) if isinstance(template, str) else None
    value = values.get(match.group(1)) if match else None
    return value if isinstance(value, list) else None


def repo_path(path: str) -> Path:
    """A plan path: absolute, or relative to the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO / p


def expand_args(items, values: Values, where: str) -> list[str]:
    """An argument list: each word substituted; a nested list (a YAML alias of shared arguments) spliced
    in place; ``{for: NAME, in: "{list_var}", args: [...]}`` repeats ``args`` once per value of the list
    var, with ``{NAME}`` bound to it."""
    out: list[str] = []
    for item in items:
        if isinstance(item, list):
            out += expand_args(item, values, where)
        elif isinstance(item, Mapping):
            out += _for_group(item, values, where)
        else:
            out.append(substitute(item, values, where))
    return out


def _for_group(group: Mapping, values: Values, where: str) -> list[str]:
    if set(group) != FOR_KEYS:
        raise PlanError(f"{where}: an argument group takes exactly the keys for, in, args; "
                        f"got {sorted(group)}")
    name, seq = group["for"], list_var(group["in"], values)
    if not isinstance(name, str) or not NAME.match(name) or name in values:
        raise PlanError(f"{where}: `for: {name}` must name a new identifier (not a var, axis or builtin)")
    if seq is None or not isinstance(group["args"], list):
        raise PlanError(f"{where}: `for: {name}` needs `in: \"{{a list var}}\"` and a list of args")
    return [a for v in seq for a in expand_args(group["args"], {**values, name: v}, where)]


# ---- vars -------------------------------------------------------------------------------------------


def _var_value(where: str, name: str, value, values: Values):
    if isinstance(value, list):
        try:
            return [text(v) for v in value]
        except TypeError as err:
            raise PlanError(f"{where} var {name}: a list var holds strings or numbers: {err}") from None
    return substitute(value, values, f"{where} var {name}")


def resolve_vars(where: str, given, out: Path, overrides: Mapping[str, object],
                 profile: str | None) -> dict[str, str | list[str]]:
    """The plan's vars in order, each allowed to use ``{out}`` and the vars above it. ``overrides`` (the
    profile's vars updated by ``--set NAME=VALUE``) replace values; a string or a number for a list var is
    a list (a string splits on commas; ``seeds: 0`` is ``[0]``)."""
    if not isinstance(given or {}, Mapping):
        raise PlanError(f"{where}: vars must be a mapping of name -> value")
    given = dict(given or {})
    unknown = sorted(set(overrides) - set(given))
    if unknown:
        raise PlanError(f"{where}: --set names unknown var(s) {', '.join(unknown)}; "
                        f"vars: {', '.join(given)}")
    values: dict[str, str | list[str]] = {"out": str(out), "profile": profile or ""}
    for name, value in given.items():
        if not NAME.match(str(name)) or name in BUILTINS:
            raise PlanError(f"{where}: var {name!r} must be an identifier other than {', '.join(BUILTINS)}")
        if name in overrides:
            value = overrides[name]
            if isinstance(given[name], list) and isinstance(value, str):
                value = [v for v in value.split(",") if v]
            elif isinstance(given[name], list) and isinstance(value, int | float) and value is not True \
                    and value is not False:
                value = [value]
        values[name] = _var_value(where, name, value, values)
    return values


# ---- profiles -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """One named set of overrides: config files per stage node (stacked after the node's own) and vars."""

    configs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    vars: Mapping[str, object] = field(default_factory=dict)


def read_profiles(where: str, raw) -> dict[str, Profile]:
    """``{profile: Profile}`` in plan order; ``{}`` for a plan without profiles."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not raw:
        raise PlanError(f"{where}: profiles must be a non-empty mapping of name -> "
                        "{stage node: [config, ...]}")
    out: dict[str, Profile] = {}
    for name, entries in raw.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise PlanError(f"{where}: profile name {name!r} must be an identifier")
        if not isinstance(entries or {}, Mapping):
            raise PlanError(f"{where}: profile {name!r} must map stage nodes to lists of config files")
        entries = dict(entries or {})
        profile_vars = entries.pop("vars", None) or {}
        if not isinstance(profile_vars, Mapping):
            raise PlanError(f"{where}: profile {name!r}: vars must be a mapping of var -> value")
        configs = {}
        for node, files in entries.items():
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise PlanError(f"{where}: profile {name!r} node {node!r}: expected a list of config files")
            configs[str(node)] = tuple(files)
        out[name] = Profile(configs, dict(profile_vars))
    return out


def choose_profile(where: str, profiles: Mapping, name: str | None) -> str | None:
    """The profile to use: ``name``, or the plan's first; None for a plan without profiles."""
    if not profiles:
        if name is not None:
            raise PlanError(f"{where}: --profile {name} given, but the plan declares no profiles")
        return None
    if name is None:
        return next(iter(profiles))
    if name not in profiles:
        raise PlanError(f"{where}: unknown profile {name!r}; the plan's profiles: {', '.join(profiles)}")
    return name


def check_profile_nodes(where: str, profiles: Mapping[str, Profile], kinds: Mapping[str, str]) -> None:
    """Every profile names existing stage nodes (``kinds``: node -> kind) and existing files (a node's
    fields like ``{benchmark}`` are left to the node's points, which check their files when expanded)."""
    stages = [n for n, kind in kinds.items() if kind == "stage"]
    for name, profile in profiles.items():
        for node, files in profile.configs.items():
            if node not in stages:
                raise PlanError(f"{where}: profile {name!r} names {node!r}, which is not a stage node of the "
                                f"plan ({', '.join(stages)})")
            for file in files:
                if "{" not in file and not repo_path(file).is_file():
                    raise PlanError(f"{where}: profile {name!r} node {node!r}: config file not found: "
                                    f"{repo_path(file)}")

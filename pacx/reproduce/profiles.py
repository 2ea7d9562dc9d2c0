"""Named profiles of a plan: the same graph under another set of config overrides (docs/method.md#profiles).

A plan may declare, at the top level::

    profiles:
      paper: {}                      # the configs as they are
      authors:                       # stage node -> override configs, stacked after the node's own config
        stage1: [configs/stage1/mae_vitb_chexpert_ratio075.yaml]
        stage2: [configs/stage2/pacx_vitb_symile_bs500.yaml, ...]

``scripts/reproduce_paper.py PLAN --profile NAME`` picks one (default: the first). Each override file adds one
``--config`` to the node's Stage command, after its own config, so one file carries one difference.
``{profile}`` is defined in every string of the plan, ``out`` included, so that each profile's runs land in
their own directory; ``<out>/.plan/profile`` records which profile a directory belongs to, and running
another profile into it is an error (:func:`claim_out_dir`).

:func:`profile_differences` resolves every overridden node's configs under each profile (the YAML files
merged in order: mappings key by key, anything else replaced, as the Stage CLIs merge several ``--config``)
and lists the settings whose values differ; ``--dry-run`` prints them side by side (:func:`format_differences`).
``trainer.default_root_dir`` is left out: the plan sets every run directory itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import yaml

from pacx.reproduce.plan import Node, Plan, PlanError, repo_path

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*$")
PLAN_SET = ("trainer.default_root_dir",)  # settings the plan gives every run itself
MARKER = "profile"


def read_profiles(where: str, raw) -> dict[str, dict[str, tuple[str, ...]]]:
    """``{profile: {stage node: (override config, ...)}}`` in plan order; ``{}`` for a plan without profiles."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not raw:
        raise PlanError(f"{where}: profiles must be a non-empty mapping of name -> {{stage node: [config, ...]}}")
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for name, nodes in raw.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise PlanError(f"{where}: profile name {name!r} must be an identifier")
        if not isinstance(nodes or {}, Mapping):
            raise PlanError(f"{where}: profile {name!r} must map stage nodes to lists of config files")
        out[name] = {}
        for node, files in (nodes or {}).items():
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise PlanError(f"{where}: profile {name!r} node {node!r}: expected a list of config files")
            out[name][str(node)] = tuple(files)
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


def check_profile_nodes(where: str, profiles: Mapping[str, Mapping[str, tuple[str, ...]]],
                        nodes: Mapping[str, Node]) -> None:
    """Every profile names existing stage nodes and existing files (a node's fields like ``{benchmark}``
    are left to the node's points, which check their files when the plan expands them)."""
    for profile, overrides in profiles.items():
        for node, files in overrides.items():
            if node not in nodes or nodes[node].kind != "stage":
                stages = [n for n, v in nodes.items() if v.kind == "stage"]
                raise PlanError(f"{where}: profile {profile!r} names {node!r}, which is not a stage node of the plan "
                                f"({', '.join(stages)})")
            for file in files:
                if "{" not in file and not repo_path(file).is_file():
                    raise PlanError(f"{where}: profile {profile!r} node {node!r}: config file not found: "
                                    f"{repo_path(file)}")


def claim_out_dir(plan: Plan) -> None:
    """Record the plan's profile in ``<out>/.plan/profile``; an output directory of another profile is an error."""
    if plan.profile is None:
        return
    marker = plan.state_dir / MARKER
    if marker.is_file() and marker.read_text().strip() != plan.profile:
        raise PlanError(f"{plan.out} holds the runs of profile {marker.read_text().strip()!r}, not {plan.profile!r}: "
                        "give each profile its own --out (the default out uses {profile})")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(plan.profile + "\n")


# ---- resolved differences ----------------------------------------------------------------------------------


def merge(base: dict, override: Mapping) -> dict:
    """``override`` merged into a copy of ``base``: mappings key by key, anything else replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists are leaves)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def resolved_config(files: list[str]) -> dict[str, object]:
    """The settings of several ``--config`` files as one flat mapping, later files winning."""
    tree: dict = {}
    for file in files:
        tree = merge(tree, yaml.safe_load(Path(file).read_text()) or {})
    return flatten(tree)


def config_files(argv: tuple[str, ...]) -> list[str]:
    """The ``--config`` files of a Stage command, in order."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]


def profile_differences(plans: Mapping[str, Plan]) -> list[tuple[str, str, dict[str, object]]]:
    """``[(node, setting, {profile: value}), ...]`` for every setting of a stage node whose resolved value
    differs between the profiles (``plans``: the same plan loaded once per profile); grid nodes are read
    at every point and listed once per distinct difference."""
    first = next(iter(plans.values()))
    rows: list[tuple[str, str, dict[str, object]]] = []
    for name, node in first.nodes.items():
        if node.kind != "stage":
            continue
        seen = set()
        for index in range(len(node.points)):
            resolved = {p: resolved_config(config_files(plan.nodes[name].points[index].argv))
                        for p, plan in plans.items()}
            for key in sorted(set().union(*resolved.values()) - set(PLAN_SET)):
                values = {p: r.get(key, "(default)") for p, r in resolved.items()}
                marker = (key, repr(values))
                if len({repr(v) for v in values.values()}) > 1 and marker not in seen:
                    seen.add(marker)
                    rows.append((name, key, values))
    return rows


def format_differences(rows: list[tuple[str, str, dict[str, object]]], profiles: tuple[str, ...],
                       chosen: str | None) -> str:
    """The differences as a table of ``#`` comment lines (the dry run's output stays a valid script)."""
    if not rows:
        return f"# profiles {', '.join(profiles)}: no setting differs\n"
    header = ("node", "setting", *profiles)
    cells = [header] + [(node, key, *(str(values[p]) for p in profiles)) for node, key, values in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [f"# profile {chosen}: settings that differ between the plan's profiles (resolved from the configs)"]
    lines += ["# " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"

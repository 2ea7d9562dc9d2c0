"""Named profiles of a plan: the same graph under other override configs and vars (docs/method.md#profiles).
A profile maps stage nodes to config files stacked after each node's own (and may set ``vars``); reading
them is :mod:`pacx.reproduce.values`. Here: an output directory belongs to one profile
(:func:`claim_out_dir`), and the settings that differ between profiles, resolved from the configs
(:func:`profile_differences`; ``--dry-run`` prints them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from pacx.reproduce.plan import Plan, PlanError

PLAN_SET = ("trainer.default_root_dir",)  # settings the plan gives every run itself
MARKER = "profile"


def claim_out_dir(plan: Plan) -> None:
    """Record the plan's profile in ``<out>/.plan/profile``; an output directory of another profile is an
    error."""
    if plan.profile is None:
        return
    marker = plan.state_dir / MARKER
    if marker.is_file() and marker.read_text().strip() != plan.profile:
        raise PlanError(f"{plan.out} holds the runs of profile {marker.read_text().strip()!r}, "
                        f"not {plan.profile!r}: give each profile its own --out "
                        "(the default out uses {profile})")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(plan.profile + "\n")


# ---- resolved differences ----------------------------------------------------------------------------------


def merge(base: dict, override: Mapping) -> dict:
    """``override`` merged into a copy of ``base``: mappings key by key, anything else replaced."""
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, Mapping) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if nested else value
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
    at every point they have in all profiles and listed once per distinct difference, and a node whose
    number of points differs gets a ``(points)`` row."""
    first = next(iter(plans.values()))
    rows: list[tuple[str, str, dict[str, object]]] = []
    for name, node in first.nodes.items():
        if node.kind != "stage":
            continue
        counts = {p: len(plan.nodes[name].points) for p, plan in plans.items()}
        if len(set(counts.values())) > 1:
            rows.append((name, "(points)", counts))
        seen = set()
        # a point is matched by name: with other axis values an index names another combination
        points = {p: {point.name: point for point in plan.nodes[name].points} for p, plan in plans.items()}
        for point in node.points:
            if not all(point.name in named for named in points.values()):
                continue
            resolved = {p: resolved_config(config_files(points[p][point.name].argv)) for p in plans}
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
    lines = [f"# profile {chosen}: settings that differ between the plan's profiles "
             "(resolved from the configs)"]
    lines += ["# " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"

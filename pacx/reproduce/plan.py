"""Reading a reproduction plan (YAML) into a validated graph: nodes in topological order, grid nodes
expanded into points (``itertools.product`` order; a point's index is its Slurm array index). Everything
checkable before a job starts is checked here; each error is a :class:`PlanError` naming the plan file
and the node. The format: :mod:`pacx.reproduce`."""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from pacx.reproduce.values import (
    BUILTINS,
    NAME,
    REPO,
    PlanError,
    Values,
    check_profile_nodes,
    choose_profile,
    expand_args,
    list_var,
    read_profiles,
    repo_path,
    resolve_vars,
    substitute,
    text,
)

# `anchors` holds YAML anchors of shared argument lists; the loader ignores it
PLAN_KEYS = {"name", "out", "python", "trainer", "seed", "vars", "slurm", "nodes", "profiles", "anchors"}
SLURM_KEYS = {"sbatch_args", "defaults"}
NODE_KEYS = {"name", "after", "stage", "config", "script", "args", "stdout", "seed", "trainer", "grid",
             "run_dir", "resources", "sbatch_args", "max_parallel", "local_parallel"}
RUN_DIR = {False: "{out}/runs/{node}", True: "{out}/runs/{node}/{point}"}  # default per "is a grid"
_AXIS_VALUE = re.compile(r"[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class Resources:
    """What one job (or one array task) asks Slurm for."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0  # 0: no --gpus-per-node (CPU partitions)
    cpus_per_task: int = 1
    time: str = "01:00:00"
    mem: str | None = None  # e.g. "64G"; None: the partition's default


@dataclass(frozen=True)
class Point:
    """One run of a node: the whole node, or one grid combination (``index`` = its array index)."""

    index: int
    name: str  # "" for a node without a grid, else "axis=value_axis=value"
    run_dir: str
    argv: tuple[str, ...]  # Stage CLI arguments (kind "stage") or the interpreter's arguments (kind "script")
    stdout: str | None = None
    values: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "run_dir": self.run_dir, "argv": list(self.argv),
                "stdout": self.stdout, "values": dict(self.values)}


@dataclass(frozen=True)
class Node:
    name: str
    kind: str  # a key of NODE_KINDS
    target: str | None  # the Stage module ("Stage1_MAE") for kind "stage"
    after: tuple[str, ...]
    points: tuple[Point, ...]
    axes: tuple[str, ...]  # grid axes, () without a grid
    resources: Resources
    sbatch_args: tuple[str, ...] = ()
    max_parallel: int | None = None
    # its points may run side by side under --local --jobs N (N > 1): True, N at a time; an integer k, k at
    # a time (each with cores // k threads, at least 1)
    local_parallel: bool | int = False

    @property
    def is_grid(self) -> bool:
        return bool(self.axes)

    def local_width(self, jobs: int) -> int:
        """How many of its points the local driver runs at once under ``--jobs jobs``: 1 without the flag or
        with ``jobs`` 1; ``jobs`` for ``local_parallel: true``; the node's own k for ``local_parallel: k``."""
        if jobs <= 1 or self.local_parallel is False:
            return 1
        return jobs if self.local_parallel is True else self.local_parallel


@dataclass(frozen=True)
class Plan:
    path: Path
    name: str
    out: Path
    python: str
    sbatch_args: tuple[str, ...]
    nodes: dict[str, Node]  # topological order (plan order among independent nodes)
    profile: str | None = None  # the chosen profile (pacx.reproduce.profiles), None for a plan without any
    profiles: tuple[str, ...] = ()

    @property
    def state_dir(self) -> Path:
        return self.out / ".plan"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def spec_path(self, node: str) -> Path:
        return self.state_dir / "nodes" / f"{node}.json"


# ---- the plan -------------------------------------------------------------------------------------


def _check_keys(where: str, got: Mapping, known: set[str]) -> None:
    if not isinstance(got, Mapping):
        raise PlanError(f"{where}: expected a mapping, got {type(got).__name__}")
    unknown = sorted(set(got) - known)
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _str_list(where: str, value, key: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PlanError(f"{where}: {key} must be a list, got {type(value).__name__} {value!r}")
    return value


def _resources(where: str, base: Resources, given) -> Resources:
    if given is None:
        return base
    _check_keys(f"{where} resources", given, {f.name for f in dataclasses.fields(Resources)})
    for key, value in given.items():
        if key in ("time", "mem"):
            if value is not None and not isinstance(value, str):
                raise PlanError(f"{where} resources: {key} must be a string like \"04:00:00\", got {value!r}")
        elif (isinstance(value, bool) or not isinstance(value, int)
              or value < (0 if key == "gpus_per_node" else 1)):
            raise PlanError(f"{where} resources: {key} must be a positive integer, got {value!r}")
    return dataclasses.replace(base, **given)


def _resolve_python(given) -> str:
    python = given or os.environ.get("PACX_PYTHON") or sys.executable
    return str(python)


def load_plan(path: str | Path, out: str | Path | None = None, overrides: Mapping[str, str] | None = None,
              profile: str | None = None) -> Plan:
    """Read, validate and expand the plan at ``path``; ``out`` overrides the plan's ``out``, ``overrides``
    (``--set NAME=VALUE``) replace var values and ``profile`` picks one of its profiles (default: the
    first)."""
    path = Path(path).resolve()
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise PlanError(f"cannot read the plan {path}: {err}") from None
    except yaml.YAMLError as err:
        raise PlanError(f"{where}: not valid YAML: {err}") from None
    _check_keys(where, raw, PLAN_KEYS)
    name = raw.get("name") or path.stem
    profiles = read_profiles(where, raw.get("profiles"))
    chosen = choose_profile(where, profiles, profile)
    out_given = out if out is not None else raw.get("out")
    if not out_given:
        raise PlanError(f"{where}: no output directory: set `out:` in the plan or pass --out")
    out_given = substitute(str(out_given), {"profile": chosen or ""}, f"{where} out")
    out_dir = (Path(out_given).expanduser().resolve() if out is not None
               else repo_path(str(out_given)).resolve())
    chosen_profile = profiles[chosen] if chosen else None
    unknown = sorted(set(chosen_profile.vars if chosen_profile else ()) - set(raw.get("vars") or {}))
    if unknown:
        raise PlanError(f"{where}: profile {chosen!r} sets unknown var(s) {', '.join(unknown)}")
    values = resolve_vars(where, raw.get("vars"), out_dir,
                          {**(chosen_profile.vars if chosen_profile else {}), **(overrides or {})}, chosen)
    slurm = raw.get("slurm") or {}
    _check_keys(f"{where} slurm", slurm, SLURM_KEYS)
    defaults = _resources(f"{where} slurm.defaults", Resources(), slurm.get("defaults"))
    plan_args = [substitute(a, values, f"{where} slurm.sbatch_args")
                 for a in _str_list(where, slurm.get("sbatch_args"), "slurm.sbatch_args")]
    context = _PlanContext(where, values, raw.get("trainer"), raw.get("seed"), defaults,
                           chosen_profile.configs if chosen_profile else {})
    nodes_raw = raw.get("nodes")
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise PlanError(f"{where}: `nodes` must be a non-empty list")
    nodes: dict[str, Node] = {}
    for i, node_raw in enumerate(nodes_raw):
        node = _build_node(context, i, node_raw)
        if node.name in nodes:
            raise PlanError(f"{where}: two nodes are named {node.name!r}")
        nodes[node.name] = node
    check_profile_nodes(where, profiles, {n: node.kind for n, node in nodes.items()})
    ordered = _topological(where, nodes)
    _check_unique_run_dirs(where, ordered)
    return Plan(path, str(name), out_dir, _resolve_python(raw.get("python")), tuple(plan_args), ordered,
                chosen, tuple(profiles))


# ---- nodes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PlanContext:
    where: str
    values: Values
    trainer: str | None
    seed: int | str | None
    defaults: Resources
    profile_configs: Mapping[str, tuple[str, ...]]  # stage node -> the chosen profile's override configs


def _grid_axes(where: str, grid, values: Values) -> list[tuple[str, list[tuple[str, list]]]]:
    """``[(axis, [(value, extra args), ...]), ...]``: a list axis has no extra args, a mapping axis appends
    its choice's argument list; ``axis: "{name}"`` takes the values of the list var ``name`` (which may be
    empty: a node whose grid has an empty axis has no points and is skipped)."""
    if grid is None:
        return []
    if not isinstance(grid, Mapping) or not grid:
        raise PlanError(f"{where}: grid must be a non-empty mapping of axis -> values")
    axes = []
    for axis, choices in grid.items():
        if not NAME.match(str(axis)) or axis in BUILTINS or axis in values:
            raise PlanError(f"{where}: grid axis {axis!r} must be an identifier that is not a var or one of "
                            f"{', '.join(BUILTINS)}")
        from_var = list_var(choices, values)
        if from_var is not None:
            options = [(v, []) for v in from_var]
        elif isinstance(choices, Mapping):
            options = [(text(k), _str_list(f"{where} grid.{axis}.{k}", v, "arguments"))
                       for k, v in choices.items()]
        elif isinstance(choices, list):
            options = [(text(v), []) for v in choices]
        else:
            raise PlanError(f"{where}: grid axis {axis!r} must be a list of values or a mapping "
                            "value -> arguments")
        if not options and from_var is None:
            raise PlanError(f"{where}: grid axis {axis!r} has no values")
        for value, _ in options:
            if not _AXIS_VALUE.match(value):
                raise PlanError(f"{where}: grid axis {axis!r} value {value!r} may hold only letters, digits "
                                "and _.+- (it names run directories)")
        if len({v for v, _ in options}) != len(options):
            raise PlanError(f"{where}: grid axis {axis!r} repeats a value")
        axes.append((str(axis), options))
    return axes


def _stage_points(ctx: _PlanContext, where: str, raw: Mapping, base: dict[str, str],
                  extra: list[str]) -> list[str]:
    """The Stage CLI ``fit`` arguments of one point (``--ckpt_path`` is decided when it runs)."""
    trainer = raw["trainer"] if "trainer" in raw else ctx.trainer
    argv = ["fit"]
    # a node's config is one file or a list stacked in order (a mode's base, then the benchmark's override);
    # the profile's overrides stack after them
    configs = raw["config"] if isinstance(raw["config"], list) else [raw["config"]]
    for config in (*configs, *ctx.profile_configs.get(raw["name"], ())):
        path = repo_path(substitute(config, base, where))
        if not path.is_file():
            raise PlanError(f"{where}: config file not found: {path}")
        argv += ["--config", str(path)]
    if trainer:
        fragment = repo_path(substitute(trainer, base, where))
        if not fragment.is_file():
            raise PlanError(f"{where}: trainer fragment not found: {fragment}")
        argv += ["--trainer", str(fragment)]
    argv += ["--trainer.default_root_dir", base["run_dir"]]
    seed = raw["seed"] if "seed" in raw else ctx.seed
    if seed is not None:
        seed_text = substitute(seed, base, f"{where} seed")
        if not re.fullmatch(r"-?\d+", seed_text):
            raise PlanError(f"{where}: seed must be an integer, got {seed_text!r}")
        argv += ["--seed_everything", seed_text]
    return argv + expand_args(_str_list(where, raw.get("args"), "args"), base, where) + extra


def _script_points(ctx: _PlanContext, where: str, raw: Mapping, base: dict[str, str],
                   extra: list[str]) -> list[str]:
    """The interpreter's arguments: ``script`` then ``args`` then the grid's mapping-axis arguments."""
    argv = expand_args(raw["script"], base, where)
    return argv + expand_args(_str_list(where, raw.get("args"), "args"), base, where) + extra


#: node kind -> (the key that selects it, keys it requires, keys it refuses, argv builder)
NODE_KINDS: dict[str, tuple[str, set[str], set[str], Callable]] = {
    "stage": ("stage", {"config"}, {"script", "stdout"}, _stage_points),
    "script": ("script", set(), {"stage", "config", "trainer", "seed"}, _script_points),
}


def _build_node(ctx: _PlanContext, i: int, raw) -> Node:
    _check_keys(f"{ctx.where} nodes[{i}]", raw, NODE_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise PlanError(f"{ctx.where} nodes[{i}]: name must be an identifier (letters, digits, _), "
                        f"got {name!r}")
    where = f"{ctx.where} node {name!r}"
    kinds = [k for k, (key, *_rest) in NODE_KINDS.items() if key in raw]
    if len(kinds) != 1:
        raise PlanError(f"{where}: give exactly one of {', '.join(v[0] for v in NODE_KINDS.values())}")
    kind = kinds[0]
    _key, required, refused, build_argv = NODE_KINDS[kind]
    missing, clash = sorted(required - set(raw)), sorted(refused & set(raw))
    if missing or clash:
        raise PlanError(f"{where}: a {kind} node " + (f"needs {', '.join(missing)}" if missing else
                                                      f"takes no {', '.join(clash)}"))
    target = None
    if kind == "stage":
        script = repo_path(str(raw["stage"]))
        if script.suffix != ".py" or not script.is_file():
            raise PlanError(f"{where}: stage script not found: {script} (e.g. Stage1_MAE.py)")
        parts = script.resolve().with_suffix("").parts
        root = REPO.resolve().parts  # the module to import: Stage1_MAE, pacx.teacher_cli
        target = ".".join(parts[len(root):]) if parts[:len(root)] == root else script.stem
    else:
        _str_list(where, raw["script"], "script")
        if not raw["script"]:
            raise PlanError(f"{where}: script is an empty argument list")
    after = tuple(_str_list(where, raw.get("after"), "after"))
    axes = _grid_axes(where, raw.get("grid"), ctx.values)
    points = []
    combos = itertools.product(*(options for _axis, options in axes)) if axes else [()]
    for index, combo in enumerate(combos):
        values = {axis: value for (axis, _), (value, _) in zip(axes, combo)}
        point = "_".join(f"{axis}={value}" for axis, value in values.items())
        pwhere = f"{where} point {point}" if point else where
        base = {**ctx.values, **values, "node": name, "point": point}
        run_dir = repo_path(substitute(raw.get("run_dir") or RUN_DIR[bool(axes)], base, f"{pwhere} run_dir"))
        base["run_dir"] = str(run_dir)
        extra = expand_args([args for _, (_, args) in zip(axes, combo)], base, pwhere)
        argv = build_argv(ctx, pwhere, raw, base, extra)
        stdout = substitute(raw["stdout"], base, pwhere) if raw.get("stdout") else None
        points.append(Point(index, point, str(run_dir), tuple(argv), stdout, values))
    max_parallel = raw.get("max_parallel")
    if max_parallel is not None and (not isinstance(max_parallel, int) or isinstance(max_parallel, bool)
                                     or max_parallel < 1 or not axes):
        raise PlanError(f"{where}: max_parallel must be a positive integer on a grid node, "
                        f"got {max_parallel!r}")
    local_parallel = raw.get("local_parallel", False)
    counted = isinstance(local_parallel, int) and not isinstance(local_parallel, bool) and local_parallel >= 2
    if not (isinstance(local_parallel, bool) or counted) or (local_parallel and not axes):
        raise PlanError(f"{where}: local_parallel must be true, false or a number of points at once (>= 2), "
                        f"and set only on a grid node, got {local_parallel!r}")
    sbatch_args = tuple(substitute(a, {**ctx.values, "node": name}, where)
                        for a in _str_list(where, raw.get("sbatch_args"), "sbatch_args"))
    return Node(name, kind, target, after, tuple(points), tuple(a for a, _ in axes),
                _resources(where, ctx.defaults, raw.get("resources")), sbatch_args, max_parallel,
                local_parallel)


def _topological(where: str, nodes: dict[str, Node]) -> dict[str, Node]:
    for node in nodes.values():
        unknown = [a for a in node.after if a not in nodes]
        if unknown:
            raise PlanError(f"{where} node {node.name!r}: `after` names unknown node(s) "
                            f"{', '.join(unknown)}; nodes: {', '.join(nodes)}")
        if node.name in node.after:
            raise PlanError(f"{where} node {node.name!r}: a node cannot run after itself")
    ordered: dict[str, Node] = {}
    while len(ordered) < len(nodes):
        ready = [n for n in nodes.values() if n.name not in ordered and all(a in ordered for a in n.after)]
        if not ready:
            raise PlanError(f"{where}: dependency cycle {' -> '.join(_cycle(nodes, set(ordered)))}")
        ordered[ready[0].name] = ready[0]
    return ordered


def _cycle(nodes: dict[str, Node], done: set[str]) -> list[str]:
    """One cycle among the nodes not in ``done`` (each of them has an unfinished parent)."""
    start = next(n for n in nodes if n not in done)
    path = [start]
    while True:
        parent = next(a for a in nodes[path[-1]].after if a not in done)
        if parent in path:
            return [*path[path.index(parent):], parent][::-1]
        path.append(parent)


def _check_unique_run_dirs(where: str, nodes: dict[str, Node]) -> None:
    seen: dict[str, str] = {}
    for node in nodes.values():
        for point in node.points:
            label = f"{node.name} {point.name}".strip()
            if point.run_dir in seen:
                raise PlanError(f"{where}: {seen[point.run_dir]} and {label} share the run directory "
                                f"{point.run_dir}")
            seen[point.run_dir] = label

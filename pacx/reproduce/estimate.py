"""What a plan costs in GPU-hours, from measured per-GPU rates (docs/performance.md#estimate).

    python scripts/reproduce_paper.py plans/paper.yaml --estimate rates.json [--profile P] [--json F]

Owns the rates file (:func:`read_rates`, :func:`merge_rates`) and the per-node sums and table; what one
point costs is :mod:`pacx.reproduce.costs`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pacx.reproduce.costs import point_work
from pacx.reproduce.plan import Node, Plan
from pacx.utils import write_json_atomic

_ON_GPU = "--device cuda --precision bf16 --fused-adamw"  # on the kind of GPU the plan will run on
#: rate key -> the command that measures it
RATE_COMMANDS: dict[str, str] = {
    "stage1": "scripts/benchmark_fit.py --device cuda --compile",  # a real fit, not the bare step
    "stage2_lora": f"scripts/benchmark_train.py --stage2 {_ON_GPU} --batch-size 128",
    "stage2_full": f"scripts/benchmark_train.py --stage2 {_ON_GPU} --batch-size 128",
    "seg": f"scripts/benchmark_train.py --stage3 {_ON_GPU} --batch-size 256",
    "probe_features": f"scripts/benchmark_train.py --stage3 {_ON_GPU} --batch-size 256",
}
SECONDS_PER_HOUR = 3600


# ---- the rates file --------------------------------------------------------------------------------------


def _check_entry(key: str, entry, where: str) -> None:
    rate = entry.get("img_per_s") if isinstance(entry, Mapping) else None
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"{where}: rate {key!r} needs a positive number img_per_s, got {entry!r}")


def read_rates(path: str | Path) -> dict[str, dict]:
    """The rates file at ``path``, checked: an object of entries, each with a positive ``img_per_s``."""
    path = Path(path)
    try:
        rates = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(rates, dict):
        raise ValueError(f"{path}: expected a JSON object of rate key -> {{\"img_per_s\": ...}}")
    for key, entry in rates.items():
        _check_entry(key, entry, str(path))
    return rates


def merge_rates(path: str | Path, entries: Mapping[str, Mapping]) -> dict[str, dict]:
    """Add ``entries`` to the rates file at ``path`` (created if missing), replacing those keys' entries and
    keeping every other key; written atomically. Returns the merged rates."""
    path = Path(path)
    for key, entry in entries.items():
        _check_entry(key, entry, "new rates")
    rates = read_rates(path) if path.is_file() else {}
    rates.update({key: dict(entry) for key, entry in entries.items()})
    write_json_atomic(path, rates)
    return rates


# ---- the estimate ----------------------------------------------------------------------------------------


@dataclass
class NodeEstimate:
    """One node's cost. ``gpu_hours`` covers the points that could be estimated (None: none could);
    ``complete`` is False when some point has no size, no rate or no timing (``notes`` say which)."""

    node: str
    kind: str
    points: int
    gpus: int  # per job: nodes × gpus_per_node
    rate_keys: list[str] = field(default_factory=list)
    images: int | None = None
    gpu_hours: float | None = None
    wall_hours: float | None = None
    complete: bool = False
    notes: list[str] = field(default_factory=list)


def missing_rate_note(key: str, rates_path: str | Path) -> str:
    command = RATE_COMMANDS.get(key)
    if command is None:
        return f"no rate for {key} (no benchmark measures it)"
    return f"no rate for {key}: run {command} --rates {rates_path}"


def estimate_node(node: Node, rates: Mapping[str, Mapping],
                  rates_path: str | Path = "RATES.json") -> NodeEstimate:
    r = node.resources
    est = NodeEstimate(node.name, node.kind, len(node.points), r.nodes * r.gpus_per_node)
    if node.kind != "stage":
        est.notes.append("script on GPU: not estimated" if est.gpus else "script (CPU): no GPU time")
        est.complete = not est.gpus
        return est
    notes: Counter[str] = Counter()
    missing: list[str] = []  # rate keys without a rate, noted once per node
    images, hours, counted = 0, 0.0, False
    for point in node.points:
        work = point_work(node, point.argv)
        if work.rate_key and work.rate_key not in est.rate_keys:
            est.rate_keys.append(work.rate_key)
        entry = rates.get(work.rate_key) if work.rate_key else None
        if work.rate_key and entry is None and work.rate_key not in missing:
            missing.append(work.rate_key)
        if work.images is None or work.rate_key is None:
            notes[work.note] += 1
        if work.images is None:
            continue
        images += work.images
        if entry is None:
            continue
        rate = float(entry["img_per_s"])
        if work.rate_scale is not None:
            factor, note = work.rate_scale(entry)
            rate *= factor
            if note:
                notes[note] += 1
        hours += work.images / rate / SECONDS_PER_HOUR
        counted = True
    est.images = images if images or not notes else None
    if counted:
        est.gpu_hours = hours
        est.wall_hours = hours / est.gpus if est.gpus else None
    node_notes = []  # the node's own (its allocation), not one point's
    if counted and not est.gpus:
        node_notes.append("no GPU asked (resources.gpus_per_node 0): wall-hours not computed")
    # a node without points (an empty grid axis) costs nothing and lacks nothing
    est.complete = ((counted or not node.points) and not missing
                    and not any(_is_gap(n) for n in [*notes, *node_notes]))
    est.notes = [n if count == est.points or est.points == 1 else f"{n} ({count} of {est.points} points)"
                 for n, count in notes.items()]
    est.notes += node_notes + [missing_rate_note(key, rates_path) for key in missing]
    return est


def _is_gap(note: str) -> bool:
    """Notes that leave a node's figure short of its true cost (the rest only explain it)."""
    return not note.startswith("rate scaled")


def estimate_plan(plan: Plan, rates: Mapping[str, Mapping],
                  rates_path: str | Path = "RATES.json") -> list[NodeEstimate]:
    return [estimate_node(node, rates, rates_path) for node in plan.nodes.values()]


def format_hours(hours: float | None) -> str:
    if hours is None:
        return "-"
    return f"{hours:,.1f}" if hours >= 10 else f"{hours:.3g}"


def format_estimate(plan: Plan, rows: list[NodeEstimate], rates: Mapping[str, Mapping],
                    rates_path: str | Path) -> str:
    """The table (node, points, images, rate key, GPU-hours, GPUs per job, wall-hours, notes) and the
    total."""
    profile = f" (profile {plan.profile})" if plan.profile else ""
    lines = [f"# GPU-hour estimate of plan {plan.name}{profile} from {rates_path} "
             "(docs/performance.md#estimate)"]
    for key in sorted({k for row in rows for k in row.rate_keys if k in rates}):
        e = rates[key]
        what = ", ".join(str(e[k]) for k in ("device_name", "precision") if e.get(k))
        batch = f", batch {e['batch']}" if e.get("batch") else ""
        rate = float(e["img_per_s"])
        lines.append(f"# {key}: {rate:,.1f} images/s per GPU ({what or 'unspecified device'}{batch})")
    header = ("node", "points", "images", "rate", "GPU-h", "GPUs", "wall-h", "note")
    cells = [header] + [(row.node, str(row.points), "-" if row.images is None else f"{row.images:,}",
                         ",".join(row.rate_keys) or "-", format_hours(row.gpu_hours), str(row.gpus),
                         format_hours(row.wall_hours), "; ".join(row.notes)) for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]
    for c in cells:
        row = "  ".join(v.ljust(w) if i in (0, 3) else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths)))
        lines.append(row + ("  " + c[-1] if c[-1] else ""))
    total = sum(row.gpu_hours or 0.0 for row in rows)
    short = [row.node for row in rows if not row.complete]
    lines.append(f"total: {format_hours(total)} GPU-hours"
                 + (f" (without what is missing for {', '.join(short)})" if short else ""))
    return "\n".join(lines) + "\n"


def estimate_json(plan: Plan, rows: list[NodeEstimate], rates_path: str | Path) -> dict:
    return {"plan": str(plan.path), "name": plan.name, "profile": plan.profile, "rates": str(rates_path),
            "nodes": {row.node: {k: v for k, v in vars(row).items() if k != "node"} for row in rows},
            "total_gpu_hours": sum(row.gpu_hours or 0.0 for row in rows),
            "complete": all(row.complete for row in rows)}

"""The paper's qualitative claim, checked on the demo's table: stated, not tuned for.

* physiology-dense task: PaCX-MAE beats MAE by more than the seed standard deviation (the larger of the two);
* structural task (segmentation): PaCX-MAE and MAE at parity (means within the larger seed std, or within
  0.01 when both stds are ~0).
"""

from __future__ import annotations

PARITY_FLOOR = 0.01


def _pair(table: dict, benchmark: str) -> tuple[dict, dict] | None:
    row = table.get(benchmark, {})
    return (row["mae"], row["pacx"]) if "mae" in row and "pacx" in row else None


def claim_lines(table: dict, tasks) -> list[str]:
    """One line per physiology / structure task of ``tasks`` saying whether the claim held, with numbers."""
    lines = []
    for task in tasks:
        pair = _pair(table, task.benchmark)
        if pair is None or task.kind not in ("physiology", "structure"):
            continue
        mae, pacx = pair
        diff, spread = pacx["mean"] - mae["mean"], max(mae["std"], pacx["std"])
        if task.kind == "physiology":
            held = diff > spread
            want = "PaCX-MAE > MAE by more than the seed std"
        else:
            held = abs(diff) <= max(spread, PARITY_FLOOR)
            want = "PaCX-MAE ≈ MAE (within the seed std)"
        lines.append(f"claim [{task.benchmark}, {task.kind}]: {want}: PaCX-MAE {pacx['mean']:.3f} ± {pacx['std']:.3f} "
                     f"vs MAE {mae['mean']:.3f} ± {mae['std']:.3f} ({pacx['metric']}), difference {diff:+.3f} → "
                     f"{'held' if held else 'did NOT hold'}")
    return lines

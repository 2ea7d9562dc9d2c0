"""The demo's closing screen: where each encoder stands between chance and a ceiling, in a few lines.

Read from the run outputs (nothing is recomputed): the alignment and zero-shot JSONs of
``scripts/eval_alignment.py``; each stage's ``metrics.csv`` (Stage 2's learning health:
``val/infonce_frac_<pair>``, ``val/effective_rank``, ``val/emb_std``, whole-split top-5 retrieval; the online
probe's ``val/online_probe_auroc`` in Stages 1 and 2); and the raw-pixel ceiling JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def last_value(metrics_csv: Path, column: str) -> float:
    """The last logged value of ``column`` in a Lightning ``metrics.csv`` (NaN when absent)."""
    if not metrics_csv.is_file():
        return math.nan
    df = pd.read_csv(metrics_csv)
    if column not in df:
        return math.nan
    values = df[column].dropna()
    return float(values.iloc[-1]) if len(values) else math.nan


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    mean = f"{np.mean(finite):.{digits}f}"
    return mean if len(finite) == 1 else f"{mean} ± {np.std(finite, ddof=1):.{digits}f}"


def alignment_lines(alignment: dict, zero_shot: dict, pacx_prefix: str = "pacx") -> list[str]:
    """Ridge R² (labs, ECG) per backbone, PaCX-MAE pooled over its upstream seeds; zero-shot top-1 vs chance."""
    groups: dict[str, list[dict]] = {}
    for name, res in alignment.items():
        groups.setdefault(pacx_prefix if name.startswith(pacx_prefix) else name, []).append(res)
    parts = [f"{name} labs {_fmt([r['labs']['r2'] for r in rs])} / ECG {_fmt([r['ecg']['r2'] for r in rs])}"
             for name, rs in groups.items()]
    lines = ["alignment ridge R² (CXR feature → teacher embedding; 0 = predicting the mean): " + "; ".join(parts)]
    if zero_shot:
        shots = [z["zero_shot"] for z in zero_shot.values()]
        lines.append(f"zero-shot 1-of-{shots[0]['group_size']} on {shots[0]['n_queries']} queries per Stage 2 seed "
                     f"(chance {shots[0]['chance']:.2f}): CXR→labs {_fmt([z['cxr_labs_acc'] for z in shots], 2)}, "
                     f"CXR→ECG {_fmt([z['cxr_ecg_acc'] for z in shots], 2)}")
    return lines


def health_lines(stage1_dir: Path, stage2_dirs: Sequence[Path]) -> list[str]:
    """Stage 2 InfoNCE/chance, effective rank, top-5 retrieval and online-probe AUROC per seed; Stage 1's probe."""
    lines = [f"Stage 1 MAE: online probe AUROC (physiology label) {_fmt([last_value(stage1_dir / 'metrics.csv', 'val/online_probe_auroc')])}"]
    for run in stage2_dirs:
        m = run / "metrics.csv"
        rank, std = last_value(m, "val/effective_rank"), last_value(m, "val/emb_std")
        lines.append(
            f"Stage 2 {run.name}: val InfoNCE/chance labs {last_value(m, 'val/infonce_frac_labs'):.3f}, "
            f"ECG {last_value(m, 'val/infonce_frac_ecg'):.3f}; whole-split top-5 CXR→labs "
            f"{last_value(m, 'val/split_top5_cxr_labs'):.3f}; effective rank {rank:.1f}, emb std {std:.3f}; "
            f"online probe AUROC {last_value(m, 'val/online_probe_auroc'):.3f}")
    return lines


def ceiling_line(ceiling_json: Path) -> list[str]:
    if not ceiling_json.is_file():
        return []
    c = json.loads(ceiling_json.read_text())
    return [f"ceiling: logistic regression on the raw {c['img_size']} px pixels of {c['benchmark']} (PCA {c['pca']}): "
            f"AUROC {c['auroc']:.3f} (chance 0.5)"]

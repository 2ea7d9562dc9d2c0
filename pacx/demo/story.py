"""The demo's closing screen, ``python -m pacx.demo.story OUT`` (the plan's ``story`` node): ``OUT/table.md``
holds the table, the claim, and where each encoder stands between chance and a ceiling (alignment, zero-shot,
learning health, the raw-pixel ceiling). Everything is read from the run outputs; nothing is recomputed."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pacx.demo.claim import claim_lines, upstream_seed


@dataclass(frozen=True)
class DemoTask:
    """A Stage 3 task of the demo as the claim reads it (its runs are nodes of plans/demo.yaml)."""

    benchmark: str
    kind: str  # physiology | finding | structure (what the task probes)
    metric_column: str | None = None  # tabulated by this logged metric instead of the paper metric


TASKS: tuple[DemoTask, ...] = (
    # the echo-derived composite label, like CheXchoNet's: the physiology-dense task. AUROC rather than the
    # paper's F1 at 0.5: a 28 %-prevalence label and a probe head make F1 mostly a threshold effect.
    DemoTask("chexchonet", "physiology", "test/auroc"),
    DemoTask("tb", "finding"),  # nodule present: a plain finding
    DemoTask("covidqu_seg", "structure"),  # the lungs
)
BACKBONES = ("random", "mae", "pacx")
TABLES = Path("figures") / "tables.md"  # scripts/make_tables.py's standard output (the plan's tables node)


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


def _alphas(results: Sequence[dict]) -> str:
    """The leave-one-out penalties of a backbone's probes (labs / ECG), each value once."""
    values = [r[t]["cv"]["alpha"] for t in ("labs", "ecg") for r in results]
    return " / ".join(f"{a:g}" for a in dict.fromkeys(values))


def alignment_lines(alignment: dict, zero_shot: dict, pacx_prefix: str = "pacx") -> list[str]:
    """Ridge R² (labs, ECG) per backbone, PaCX-MAE pooled over its upstream seeds; zero-shot top-1 vs
    chance."""
    groups: dict[str, list[dict]] = {}
    for name, res in alignment.items():
        groups.setdefault(pacx_prefix if name.startswith(pacx_prefix) else name, []).append(res)
    parts = [f"{name} labs {_fmt([r['labs']['r2'] for r in rs])} / ECG {_fmt([r['ecg']['r2'] for r in rs])}"
             for name, rs in groups.items()]
    lines = ["alignment ridge R² (CXR feature → teacher embedding; 0 = predicting the mean), the paper's "
             "alpha 10: " + "; ".join(parts)]
    if all("cv" in r["labs"] for rs in groups.values() for r in rs):
        cv = [f"{name} labs {_fmt([r['labs']['cv']['r2'] for r in rs])} / ECG "
              f"{_fmt([r['ecg']['cv']['r2'] for r in rs])} (alpha {_alphas(rs)})"
              for name, rs in groups.items()]
        lines.append("alignment ridge R², alpha by leave-one-out on the fit rows: " + "; ".join(cv))
    if zero_shot:
        shots = [z["zero_shot"] for z in zero_shot.values()]
        lines.append(f"zero-shot 1-of-{shots[0]['group_size']} on {shots[0]['n_queries']} queries "
                     f"per Stage 2 seed (chance {shots[0]['chance']:.2f}): "
                     f"CXR→labs {_fmt([z['cxr_labs_acc'] for z in shots], 2)}, "
                     f"CXR→ECG {_fmt([z['cxr_ecg_acc'] for z in shots], 2)}")
    return lines


def health_lines(stage1_dir: Path, stage2_dirs: Sequence[Path]) -> list[str]:
    """Stage 2 InfoNCE/chance, effective rank, top-5 retrieval and online-probe AUROC per seed; Stage 1's
    probe."""
    stage1_auroc = last_value(stage1_dir / "metrics.csv", "val/online_probe_auroc")
    lines = [f"Stage 1 MAE: online probe AUROC (physiology label) {_fmt([stage1_auroc])}"]
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
    return [f"ceiling: logistic regression on the raw {c['img_size']} px pixels of {c['benchmark']} "
            f"(PCA {c['pca']}): AUROC {c['auroc']:.3f} (chance 0.5)"]


def upstream_seeds(results: pd.DataFrame) -> list[int]:
    """The Stage 2 seeds of the PaCX-MAE rows (from their encoder file names)."""
    weights = results.loc[results["backbone_kind"] == "pacx", "backbone_weights"]
    return sorted({seed for seed in map(upstream_seed, weights) if seed is not None})


def pooling_line(results: pd.DataFrame) -> str:
    """What the PaCX-MAE and baseline rows pool, read from the full-data results."""
    full = results[results["train_fraction"].fillna(1.0) == 1.0] if "train_fraction" in results else results
    probe = {kind: full.loc[full["backbone_kind"] == kind, "seed"].nunique() for kind in ("pacx", "mae")}
    return (f"Stage 1 is shared; PaCX-MAE rows pool {len(upstream_seeds(results))} Stage 2 seeds × "
            f"{probe['pacx']} probe seed(s), random init and MAE {probe['mae']} probe seeds.")


def write_story(out: Path) -> str:
    """``out/table.md``: the pooling, the Markdown table, the claim and the story lines; returns its text."""
    results = pd.read_csv(out / "stage3" / "results.csv")
    markdown = (out / TABLES).read_text().split("\\begin{tabular}")[0].strip()
    story = claim_lines(json.loads((out / "table.json").read_text()), TASKS, results)
    story += alignment_lines(json.loads((out / "alignment.json").read_text()),
                             json.loads((out / "zero_shot.json").read_text()))
    story += health_lines(out / "stage1_mae", [out / f"stage2_pacx_s{s}" for s in upstream_seeds(results)])
    story += ceiling_line(out / "ceiling.json")
    text = pooling_line(results) + "\n\n" + markdown + "\n\n" + "\n".join(story)
    (out / "table.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the demo's table.md from its run outputs.")
    parser.add_argument("out", type=Path, help="the demo's output directory")
    write_story(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

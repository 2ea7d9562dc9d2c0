"""The paper's side of the tables: the metric each table reports, the published numbers, and the
reproduction report ``comparison.md`` that sets ours beside them (docs/method.md#reproduction-report).

:func:`table_metrics` re-scores results rows in each table's paper metric (from the benchmark registry),
:data:`PUBLISHED` holds the paper's numbers with :data:`SOURCE`, and :func:`comparison_markdown` puts our mean
± std beside them. All numbers here are on the paper's 0–1 scale, whatever ``--percent`` does to the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pacx.data.registry import BENCHMARKS
from pacx.eval.results import aggregate, use_metric
from pacx.eval.tables import backbone_name, benchmark_order, metric_name

SOURCE = ("Liu, Maeda, Pancholy, *PaCX-MAE: Physiology-Augmented Chest X-Ray Masked Autoencoder*, arXiv "
          "2606.01537: the main results table (linear probe; CXL-Seg: frozen backbone + decoder) and the 1 % "
          "low-data results (the same numbers are in the authors' repository README)")
TABLES = ("main", "low_data")
DELTA = "pacx-mae"  # a published difference: PaCX-MAE minus MAE


@dataclass(frozen=True)
class Published:
    """One published number: ``value`` of ``metric`` on ``benchmark`` (registry name) for ``backbone``
    (or :data:`DELTA`) at ``fraction`` of the training data; ``approx`` when the paper states it as "~"."""

    benchmark: str
    metric: str
    fraction: float
    backbone: str
    value: float
    approx: bool = False


PUBLISHED: tuple[Published, ...] = (
    *(Published("medmod_phys", "auroc", 1.0, k, v)
      for k, v in (("imagenet", 0.612), ("mae", 0.695), ("pacx", 0.722))),
    *(Published("vindr", "f1", 1.0, k, v) for k, v in (("imagenet", 0.097), ("mae", 0.191), ("pacx", 0.256))),
    *(Published("chexchonet", "f1", 1.0, k, v)
      for k, v in (("imagenet", 0.147), ("mae", 0.215), ("pacx", 0.266))),
    *(Published("tb", "auroc", 1.0, k, v) for k, v in (("imagenet", 0.887), ("mae", 0.899), ("pacx", 0.910))),
    *(Published("cxlseg", "iou", 1.0, k, v)
      for k, v in (("imagenet", 0.984), ("mae", 0.996), ("pacx", 0.996))),
    # "In the 1 % data regime ... AUROC improvements of ~8pp on CheXchoNet and ~5pp on VinDr and NIH"
    Published("chexchonet", "auroc", 0.01, DELTA, 0.08, approx=True),
    Published("vindr", "auroc", 0.01, DELTA, 0.05, approx=True),
    Published("nih", "auroc", 0.01, DELTA, 0.05, approx=True),
)


def table_metrics(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """``df`` with each registry benchmark's ``metric_value`` / ``metric`` set to the paper metric of
    ``table`` (``main``: ``spec.metric``; ``low_data``: ``spec.low_data_metric``). Rows already in that metric
    stay as they are; otherwise the metric's logged column must be present (error naming benchmark, column,
    table)."""
    if table not in TABLES:
        raise ValueError(f"table {table!r} not in {TABLES}")
    for bench in sorted(set(df["benchmark"]) & set(BENCHMARKS)):
        spec = BENCHMARKS[bench]
        metric = spec.metric if table == "main" else spec.low_data_metric
        if (df.loc[df["benchmark"] == bench, "metric"] == metric).all():
            continue
        try:
            df = use_metric(df, bench, spec.metric_column(metric))
        except ValueError as err:
            raise ValueError(f"the {table.replace('_', '-')} table reports {bench} in {metric_name(metric)}: "
                             f"{err} (--metric BENCHMARK=COLUMN picks another)") from None
    return df


@dataclass(frozen=True)
class Ours:
    mean: float
    std: float
    n: int
    paired: bool = False


def _ours(agg: pd.DataFrame, bench: str, kind: str, fraction: float) -> Ours | None:
    row = agg[(agg["benchmark"] == bench) & (agg["backbone_kind"] == kind)
              & np.isclose(agg["train_fraction"], fraction)]
    return None if row.empty else Ours(float(row["mean"].iloc[0]), float(row["std"].iloc[0]),
                                       int(row["n"].iloc[0]))


def _delta(df: pd.DataFrame, bench: str, fraction: float) -> Ours | None:
    """PaCX-MAE minus MAE: paired over seeds when every seed has one run of each (both backbones on the same
    seeds; the std of the per-seed differences), else the difference of the means over all runs with
    sqrt(std_pacx² + std_mae²)."""
    rows = df[(df["benchmark"] == bench) & np.isclose(df["train_fraction"], fraction)]
    runs = {k: rows[rows["backbone_kind"] == k] for k in ("pacx", "mae")}
    if any(r.empty for r in runs.values()):
        return None
    seeds = {k: r.groupby("seed")["metric_value"] for k, r in runs.items()}
    one_each = all((g.size() == 1).all() for g in seeds.values())
    common = sorted(set(seeds["pacx"].groups) & set(seeds["mae"].groups))
    same_seeds = set(seeds["pacx"].groups) == set(seeds["mae"].groups)  # else pairing drops runs
    if one_each and same_seeds and len(common) >= 2:
        diffs = np.array([seeds["pacx"].get_group(s).iloc[0] - seeds["mae"].get_group(s).iloc[0]
                          for s in common])
        return Ours(float(diffs.mean()), float(diffs.std(ddof=1)), len(diffs), paired=True)
    values = {k: r["metric_value"].astype(float) for k, r in runs.items()}
    stds = [float(v.std(ddof=1)) if len(v) > 1 else 0.0 for v in values.values()]
    return Ours(float(values["pacx"].mean() - values["mae"].mean()), math.hypot(*stds),
                min(len(v) for v in values.values()))


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def comparison_markdown(main: pd.DataFrame, low_data: pd.DataFrame, mode: str = "linear_probe",
                        published: Sequence[Published] = PUBLISHED) -> str:
    """``comparison.md``: every published number beside ours (``main`` / ``low_data``: results rows in each
    table's paper metric, :func:`table_metrics`). Ours is mean ± sample std over n runs; the difference is
    ours − published, ± our std (the paper reports single numbers, no spread)."""
    main, low_data = (d[(d["mode"] == mode) | (d["task"] == "segmentation")] for d in (main, low_data))
    agg = aggregate(main) if not main.empty else main
    lines = ["# Reproduction report: our numbers beside the published ones", "",
             f"Published: {SOURCE}.", "",
             "Ours: mean ± sample std over n runs (seeds, and upstream encoders where several), "
             f"mode {mode}. Difference: ours − published, ± our std (the paper gives single numbers). "
             "Scale 0–1.", "",
             "## Full training data", "",
             "| Benchmark | Metric | Backbone | Published | Ours | Difference |",
             "|---|---|---|---:|---:|---:|"]
    full = [p for p in published if p.backbone != DELTA]
    for bench in benchmark_order(p.benchmark for p in full):
        for p in (p for p in full if p.benchmark == bench):
            ours = None if agg.empty else _ours(agg, bench, p.backbone, p.fraction)
            metric_ok = ours is not None and (
                main.loc[main["benchmark"] == bench, "metric"] == p.metric).all()
            cells = ([f"{ours.mean:.3f} ± {ours.std:.3f} (n={ours.n})",
                      f"{_signed(ours.mean - p.value)} ± {ours.std:.3f}"]
                     if metric_ok else ["–", "not run" if ours is None else "other metric"])
            lines.append(f"| {bench} | {metric_name(p.metric)} | {backbone_name(p.backbone)} "
                         f"| {p.value:.3f} | " + " | ".join(cells) + " |")
    deltas = [p for p in published if p.backbone == DELTA]
    lines += ["", "## 1 % of the training data: PaCX-MAE − MAE", "",
              "| Benchmark | Metric | Published | Ours | Difference |", "|---|---|---:|---:|---:|"]
    order = benchmark_order(p.benchmark for p in deltas)
    for p in sorted(deltas, key=lambda p: order.index(p.benchmark)):
        ours = _delta(low_data, p.benchmark, p.fraction)
        metric_ok = ours is not None and (low_data.loc[low_data["benchmark"] == p.benchmark,
                                                       "metric"] == p.metric).all()
        shown = f"{'≈ ' if p.approx else ''}{_signed(p.value)}"
        cells = ([f"{_signed(ours.mean)} ± {ours.std:.3f} ({'paired, ' if ours.paired else ''}n={ours.n})",
                  f"{_signed(ours.mean - p.value)} ± {ours.std:.3f}"]
                 if metric_ok else ["–", "not run" if ours is None else "other metric"])
        lines.append(f"| {p.benchmark} | {metric_name(p.metric)} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

"""pacx/eval/tables.py and scripts/make_tables.py on a hand-made results CSV (expected numbers by hand)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pacx.eval.results import aggregate, load_results
from pacx.eval.tables import (
    low_data_figure,
    low_data_table,
    main_table,
    to_json,
    to_latex,
    to_markdown,
)

# (benchmark, task, metric column, backbone, mode, train fraction) -> metric per seed 0..4 (fewer = fewer
# seeds). Segmentation rows have mode "frozen" and no train fraction, as pacx/lit/segment.py writes them.
RUNS: dict[tuple[str, str, str, str, str, float | None], list[float]] = {
    ("chexchonet", "binary", "test/f1", "imagenet", "linear_probe", 1.0): [0.70, 0.72, 0.74, 0.76, 0.78],
    ("chexchonet", "binary", "test/f1", "mae", "linear_probe", 1.0): [0.75, 0.75, 0.76, 0.77, 0.77],
    ("chexchonet", "binary", "test/f1", "pacx", "linear_probe", 1.0): [0.80, 0.81, 0.82, 0.83, 0.84],
    ("chexchonet", "binary", "test/f1", "imagenet", "linear_probe", 0.1): [0.60] * 5,
    ("chexchonet", "binary", "test/f1", "mae", "linear_probe", 0.1): [0.63, 0.65, 0.64, 0.64, 0.64],
    ("chexchonet", "binary", "test/f1", "pacx", "linear_probe", 0.1): [0.70] * 5,
    ("chexchonet", "binary", "test/f1", "mae", "linear_probe", 0.01): [0.55] * 5,
    ("chexchonet", "binary", "test/f1", "pacx", "linear_probe", 0.01): [0.58, 0.60, 0.62, 0.59, 0.61],
    ("cxlseg", "segmentation", "test/iou", "imagenet", "frozen", None): [0.85, 0.86, 0.87, 0.88, 0.89],
    ("cxlseg", "segmentation", "test/iou", "mae", "frozen", None): [0.88] * 5,
    ("cxlseg", "segmentation", "test/iou", "pacx", "frozen", None): [0.90] * 5,
    ("tb", "binary", "test/auroc", "imagenet", "linear_probe", 1.0): [0.90],
    ("tb", "binary", "test/auroc", "pacx", "linear_probe", 1.0): [0.92] * 5,
    ("nih", "multilabel", "test/auroc_macro", "imagenet", "linear_probe", 1.0): [0.80] * 5,
    ("nih", "multilabel", "test/auroc_macro", "mae", "linear_probe", 1.0): [0.80] * 5,
    ("nih", "multilabel", "test/auroc_macro", "pacx", "linear_probe", 1.0): [0.79] * 5,
    ("nih", "multilabel", "test/auroc_macro", "pacx", "finetune", 1.0): [0.85] * 5,
}
METRIC = {"chexchonet": "f1", "cxlseg": "iou", "tb": "auroc", "nih": "auroc"}

MAIN_MARKDOWN = """\
| Benchmark | Metric | ImageNet | MAE | PaCX-MAE |
| :--- | :--- | :---: | :---: | :---: |
| chexchonet | F1 | 0.740 ± 0.032 | 0.760 ± 0.010 | **0.820 ± 0.016** |
| cxlseg | IoU | 0.870 ± 0.016 | 0.880 ± 0.000 | **0.900 ± 0.000** |
| tb | AUROC | 0.900 ± 0.000 (n=1) | – | **0.920 ± 0.000** |
| nih | AUROC | **0.800 ± 0.000** | **0.800 ± 0.000** | 0.790 ± 0.000 |
"""

MAIN_LATEX = r"""\begin{tabular}{llccc}
\toprule
Benchmark & Metric & ImageNet & MAE & PaCX-MAE \\
\midrule
chexchonet & F1 & 0.740 $\pm$ 0.032 & 0.760 $\pm$ 0.010 & \textbf{0.820 $\pm$ 0.016} \\
cxlseg & IoU & 0.870 $\pm$ 0.016 & 0.880 $\pm$ 0.000 & \textbf{0.900 $\pm$ 0.000} \\
tb & AUROC & 0.900 $\pm$ 0.000 (n=1) & -- & \textbf{0.920 $\pm$ 0.000} \\
nih & AUROC & \textbf{0.800 $\pm$ 0.000} & \textbf{0.800 $\pm$ 0.000} & 0.790 $\pm$ 0.000 \\
\bottomrule
\end{tabular}
"""


def _row(bench, task, column, kind, mode, fraction, seed, value, run_dir=None) -> dict:
    run_dir = run_dir or f"runs/{bench}/{kind}/{mode}/f{fraction}/s{seed}"
    row = {"benchmark": bench, "task": task, "metric": METRIC[bench], "backbone_kind": kind, "mode": mode}
    if fraction is not None:  # segmentation rows have no train fraction / subset seed
        row.update(train_fraction=fraction, subset_seed=seed)
    row.update({"seed": seed, column: value, "metric_value": value, "backbone_weights": f"weights/{kind}",
                "git_sha": "abc123", "run_dir": run_dir})
    if task == "binary" and column != "test/auroc":  # every classification run logs AUROC too
        row["test/auroc"] = round(value - 0.1, 6)
    return row


@pytest.fixture
def results_csv(tmp_path: Path) -> Path:
    """Results rows as Stage 3 appends them, plus a re-run of pacx seed 0 on chexchonet that supersedes a
    first, bad row (0.50 -> 0.80)."""
    rows = []
    for (bench, task, column, kind, mode, fraction), values in RUNS.items():
        for seed, value in enumerate(values):
            first = 0.50 if (bench, kind, fraction, seed) == ("chexchonet", "pacx", 1.0, 0) else value
            rows.append(_row(bench, task, column, kind, mode, fraction, seed, first))
    rows.append(_row("chexchonet", "binary", "test/f1", "pacx", "linear_probe", 1.0, 0, 0.80))
    path = tmp_path / "runs" / "results.csv"
    path.parent.mkdir()
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def results(results_csv: Path) -> pd.DataFrame:
    return load_results(results_csv)


def _stat(agg: pd.DataFrame, bench: str, kind: str, fraction: float = 1.0, mode: str = "linear_probe"):
    row = agg[(agg.benchmark == bench) & (agg.backbone_kind == kind) & (agg.train_fraction == fraction)
              & (agg["mode"] == mode)]
    assert len(row) == 1
    return row.iloc[0]


def test_load_results_supersedes_rerun_and_fills_defaults(results_csv, caplog):
    with caplog.at_level(logging.WARNING, logger="pacx.eval.results"):
        df = load_results([results_csv])
    assert "1 results row(s) superseded" in caplog.text
    assert "repeat the same test" not in caplog.text  # one row per test once the re-run supersedes
    assert len(df) == sum(len(v) for v in RUNS.values())
    rerun = df[(df.benchmark == "chexchonet") & (df.backbone_kind == "pacx") & (df.train_fraction == 1.0)
               & (df.seed == 0)]
    assert rerun["metric_value"].tolist() == [0.80]
    seg = df[df.benchmark == "cxlseg"]
    assert set(seg["train_fraction"]) == {1.0} and set(seg["mode"]) == {"frozen"}
    assert str(df["seed"].dtype) == "Int64" and df["metric_value"].dtype == float


def test_load_results_concatenates_files_later_file_wins(results_csv, tmp_path):
    rerun = pd.DataFrame([_row("tb", "binary", "test/auroc", "imagenet", "linear_probe", 1.0, 0, 0.70)])
    later = tmp_path / "later.csv"
    rerun.to_csv(later, index=False)
    df = load_results([results_csv, later])
    tb = df[(df.benchmark == "tb") & (df.backbone_kind == "imagenet")]
    assert tb["metric_value"].tolist() == [0.70] and tb["source_csv"].tolist() == [str(later)]


def test_the_same_test_from_another_run_directory_is_kept_and_warned_about(results_csv, tmp_path, caplog):
    """tb / imagenet seed 0 tested again from a new run directory: not a re-run of the same run (both rows
    stay, n becomes 2), but the warning names both directories, since the copy counts as a second seed."""
    again = _row("tb", "binary", "test/auroc", "imagenet", "linear_probe", 1.0, 0, 0.70,
                 run_dir="elsewhere/tb")
    later = tmp_path / "later.csv"
    pd.DataFrame([again]).to_csv(later, index=False)
    with caplog.at_level(logging.WARNING, logger="pacx.eval.results"):
        df = load_results([results_csv, later])
    assert "2 results row(s) repeat the same test" in caplog.text
    assert "runs/tb/imagenet/linear_probe/f1.0/s0, elsewhere/tb" in caplog.text
    assert _stat(aggregate(df), "tb", "imagenet")["n"] == 2


def test_missing_column_error_names_file_and_column(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame([_row("tb", "binary", "test/auroc", "pacx", "linear_probe", 1.0, 0, 0.9)]).drop(
        columns="metric_value").to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"bad\.csv.*'metric_value'"):
        load_results(bad)


def test_aggregate_means_and_sample_stds(results):
    agg = aggregate(results)
    expected = {  # (bench, kind, fraction): (mean, sample std, n), by hand
        ("chexchonet", "imagenet", 1.0): (0.74, math.sqrt(0.001), 5),  # SS 0.004 / 4
        ("chexchonet", "mae", 1.0): (0.76, 0.01, 5),  # SS 0.0004 / 4
        ("chexchonet", "pacx", 1.0): (0.82, math.sqrt(0.00025), 5),  # re-run row counted once
        ("chexchonet", "mae", 0.1): (0.64, math.sqrt(0.00005), 5),
        ("chexchonet", "pacx", 0.01): (0.60, math.sqrt(0.00025), 5),
        ("tb", "imagenet", 1.0): (0.90, 0.0, 1),  # one seed: std 0
        ("nih", "pacx", 1.0): (0.79, 0.0, 5),
    }
    for (bench, kind, fraction), (mean, std, n) in expected.items():
        s = _stat(agg, bench, kind, fraction)
        assert (s["mean"], s["std"], s["n"]) == (pytest.approx(mean), pytest.approx(std, abs=1e-12), n)
    seg = _stat(agg, "cxlseg", "imagenet", mode="frozen")
    assert (seg["mean"], seg["std"]) == (pytest.approx(0.87), pytest.approx(math.sqrt(0.00025)))
    assert _stat(agg, "nih", "pacx", mode="finetune")["mean"] == pytest.approx(0.85)
    pct = _stat(aggregate(results, percent=True), "chexchonet", "imagenet")
    assert (pct["mean"], pct["std"]) == (pytest.approx(74.0), pytest.approx(100 * math.sqrt(0.001)))


def test_main_table_markdown_and_latex_exact(results):
    table = main_table(results)
    assert to_markdown(table) == MAIN_MARKDOWN
    assert to_latex(table) == MAIN_LATEX


def test_main_table_percent_mode_and_other_backbones(results):
    md = to_markdown(main_table(results, percent=True))
    assert "| chexchonet | F1 | 74.0 ± 3.2 | 76.0 ± 1.0 | **82.0 ± 1.6** |" in md
    finetune = to_markdown(main_table(results, mode="finetune", backbones=("pacx", "random")))
    assert finetune.splitlines()[0] == "| Benchmark | Metric | PaCX-MAE | Random init |"
    # segmentation (single-mode) rows appear in every mode; a lone cell is not bold
    assert finetune.splitlines()[2:] == ["| cxlseg | IoU | 0.900 ± 0.000 | – |",
                                         "| nih | AUROC | 0.850 ± 0.000 | – |"]


def test_to_json_structure_and_values(results):
    data = to_json(main_table(results))
    assert list(data) == ["chexchonet", "cxlseg", "tb", "nih"]
    assert set(data["tb"]) == {"imagenet", "pacx"}  # the missing MAE cell is absent
    assert data["tb"]["imagenet"] == {"metric": "auroc", "mean": pytest.approx(0.90), "std": 0.0, "n": 1,
                                      "n_upstream": 1}
    pacx = data["chexchonet"]["pacx"]
    assert pacx == {"metric": "f1", "mean": pytest.approx(0.82), "std": pytest.approx(math.sqrt(0.00025)),
                    "n": 5, "n_upstream": 1}
    json.dumps(data)  # plain Python types


def test_n_upstream_counts_distinct_upstream_encoders():
    """Rows from 3 Stage 2 exports x 2 probe seeds: n 6, n_upstream 3, std over all six; no weights: 1."""
    rows = [_row("tb", "binary", "test/auroc", "pacx", "linear_probe", 1.0, s, 0.7 + 0.01 * u + 0.001 * s)
            | {"backbone_weights": f"exports/pacx_encoder_s{u}.safetensors", "run_dir": f"r/u{u}s{s}"}
            for u in range(3) for s in range(2)]
    rows += [_row("tb", "binary", "test/auroc", "mae", "linear_probe", 1.0, s, 0.5)
             | {"backbone_weights": None} for s in range(2)]
    data = to_json(main_table(pd.DataFrame(rows)))["tb"]
    values = [r["metric_value"] for r in rows[:6]]
    assert data["pacx"]["n"] == 6 and data["pacx"]["n_upstream"] == 3
    assert data["pacx"]["std"] == pytest.approx(float(np.std(values, ddof=1)))
    assert data["mae"]["n_upstream"] == 1


def test_low_data_table(results):
    table = low_data_table(results)
    md = to_markdown(table).splitlines()
    assert md[0] == ("| Benchmark | Metric | ImageNet 1 % | ImageNet 10 % | ImageNet 100 % | MAE 1 % | MAE "
                     "10 % | MAE 100 % | PaCX-MAE 1 % | PaCX-MAE 10 % | PaCX-MAE 100 % |")
    assert md[2:] == ["| chexchonet | F1 | – | 0.600 ± 0.000 | 0.740 ± 0.032 | 0.550 ± 0.000 | 0.640 ± 0.007 "
                      "| 0.760 ± 0.010 | **0.600 ± 0.016** | **0.700 ± 0.000** | **0.820 ± 0.016** |"]
    latex = to_latex(table)
    assert r"ImageNet 1 \% & ImageNet 10 \%" in latex and r"\begin{tabular}{ll" + "c" * 9 + "}" in latex
    assert to_json(table)["chexchonet"]["pacx@0.01"]["mean"] == pytest.approx(0.60)


def test_latex_escapes_specials(results):
    renamed = results.assign(benchmark=results["benchmark"].replace({"tb": "t&b_50%"}))
    latex = to_latex(main_table(renamed))
    assert r"t\&b\_50\% & AUROC" in latex


def test_low_data_figure_written_atomically(results, tmp_path):
    out = low_data_figure(results, tmp_path / "fig" / "low_data.png")
    assert out == tmp_path / "fig" / "low_data.png" and out.stat().st_size > 0
    with Image.open(out) as img:
        img.verify()
        assert img.format == "PNG"
    assert [p.name for p in out.parent.iterdir()] == ["low_data.png"]  # no temporary file left
    full_only = results[results.train_fraction == 1.0]
    assert low_data_figure(full_only, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_script_prints_tables_and_writes_figure(results_csv, tmp_path, capsys):
    from scripts.make_tables import main

    assert main([str(results_csv), "--json", str(tmp_path / "table.json")]) == 0
    out = capsys.readouterr().out
    assert MAIN_MARKDOWN in out and MAIN_LATEX in out
    assert "| PaCX-MAE 1 % |" in out and r"PaCX-MAE 1 \%" in out  # the low-data table, both formats
    figure = results_csv.parent / "low_data.png"
    assert f"{figure}\n" in out and figure.stat().st_size > 0
    assert json.loads((tmp_path / "table.json").read_text())["nih"]["pacx"]["mean"] == pytest.approx(0.79)


def test_use_metric_tabulates_a_benchmark_by_another_logged_metric(results):
    from pacx.eval.results import use_metric

    df = results.copy()
    df["test/auroc"] = float("nan")
    rows = df["benchmark"] == "chexchonet"
    df.loc[rows, "test/auroc"] = df.loc[rows, "metric_value"] / 2  # a distinct, known value per row
    out = use_metric(df, "chexchonet", "test/auroc")
    assert ((out.loc[rows, "metric"] == "auroc").all()
            and (out.loc[~rows, "metric"] == df.loc[~rows, "metric"]).all())
    assert out.loc[rows, "metric_value"].tolist() == (df.loc[rows, "metric_value"] / 2).tolist()
    assert out.loc[~rows, "metric_value"].tolist() == df.loc[~rows, "metric_value"].tolist()
    with pytest.raises(ValueError, match="no tb row has a value in column 'test/auroc'"):
        use_metric(df, "tb", "test/auroc")


def test_script_takes_each_tables_metric_from_the_registry(results_csv, tmp_path, capsys):
    """chexchonet: the main table in its paper metric (F1), the low-data table in AUROC (the registry's
    low_data_metric; here F1 - 0.1 by construction); --metric still overrides a benchmark in both."""
    from scripts.make_tables import main

    assert main([str(results_csv), "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert MAIN_MARKDOWN in out
    assert ("| chexchonet | AUROC | – | 0.500 ± 0.000 | 0.640 ± 0.032 | 0.450 ± 0.000 | 0.540 ± 0.007 | "
            "0.660 ± 0.010 | **0.500 ± 0.016** | **0.600 ± 0.000** | **0.720 ± 0.016** |") in out
    assert main([str(results_csv), "--out-dir", str(tmp_path), "--metric", "chexchonet=test/auroc"]) == 0
    assert ("| chexchonet | AUROC | 0.640 ± 0.032 | 0.660 ± 0.010 | **0.720 ± 0.016** |"
            in capsys.readouterr().out)
    rows = pd.read_csv(results_csv).drop(columns="test/auroc")
    rows.to_csv(tmp_path / "no_auroc.csv", index=False)
    with pytest.raises(ValueError, match=r"low-data table reports chexchonet in AUROC: .*'test/auroc'"):
        main([str(tmp_path / "no_auroc.csv"), "--out-dir", str(tmp_path)])


def test_a_metric_column_missing_from_some_rows_does_not_drop_them_from_the_mean(results):
    """chexchonet pacx at 1 %: seeds 0-4 logged AUROC, but seeds 3 and 4 come from an older CSV without the
    test/auroc column. Re-scoring in AUROC must not average 3 values and report n=5 (it did: mean of seeds
    0-2, n=5); those rows are named in an error instead."""
    from pacx.eval.results import use_metric

    rows = (results["benchmark"] == "chexchonet") & (results["backbone_kind"] == "pacx") & (
        results["train_fraction"] == 0.01)
    df = results.copy()
    df.loc[rows & (df["seed"] >= 3), "test/auroc"] = float("nan")
    with pytest.raises(ValueError, match=r"2 chexchonet row\(s\) .*no value in column 'test/auroc'.*s3"):
        use_metric(df, "chexchonet", "test/auroc")
    # rows already in the metric keep their metric_value where the column is blank: nothing is lost
    same = results.copy()
    tb = same["benchmark"] == "tb"
    same.loc[tb, "test/auroc"] = float("nan")
    same.loc[tb & (same["seed"] == 0), "test/auroc"] = 0.5  # a distinct value for seed 0 only
    out = use_metric(same, "tb", "test/auroc")
    values = [0.5, 0.92, 0.92, 0.92, 0.92]  # tb / pacx seeds 0-4 (RUNS), seed 0 re-scored
    assert out.loc[tb & (out["backbone_kind"] == "pacx"), "metric_value"].tolist() == values
    stat = _stat(aggregate(out), "tb", "pacx")
    assert stat["n"] == 5 and stat["mean"] == pytest.approx(np.mean(values))
    assert stat["std"] == pytest.approx(np.std(values, ddof=1))


HEADER = "benchmark,task,metric,backbone_kind,seed,metric_value,run_dir\n"


@pytest.mark.bad_input
@pytest.mark.parametrize("name, content, what", [
    ("ragged.csv", HEADER + "tb,binary,auroc,pacx,0,0.9,r0\ntb,binary,auroc,pacx,1,0.9,r1,x,y\n",
     r"not a readable CSV"),
    ("binary.csv", b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 20, r"not a readable CSV"),
    ("float_seed.csv", HEADER + "tb,binary,auroc,pacx,0.5,0.9,r0\n", r"column 'seed' .*integer"),
], ids=["ragged", "binary", "float_seed"])
def test_a_corrupt_results_csv_is_named_in_the_error(tmp_path, name, content, what):
    """A results CSV that is not a CSV (ragged rows, binary bytes) or holds a non-integer seed → ValueError
    naming the file (the reader's own error named no file)."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: {what}"):
        load_results([path])


def test_rows_of_different_protocols_in_one_cell_are_warned_about(results_csv, tmp_path, caplog):
    """tb / pacx: seeds 0-4 trained with the flip (the protocol), plus seeds 5-6 from an ablation with the
    plain cache (train_flip False) and pool avg. One cell pools all 7 (mean over both protocols); the load
    warns, naming the cell and the settings, since nothing else in the table shows it. Blank settings (older
    rows) do not count as a difference."""
    base = pd.read_csv(results_csv)
    base["feature_cache"], base["train_flip"], base["pool"] = True, "True", "cls"  # as read from a CSV
    base.loc[base["benchmark"] == "nih", ["train_flip", "pool"]] = [np.nan, np.nan]  # older rows
    base.loc[base["seed"] == 4, "feature_cache"] = False  # the per-epoch path: the same protocol
    ablation = pd.DataFrame([_row("tb", "binary", "test/auroc", "pacx", "linear_probe", 1.0, s, 0.80)
                             for s in (5, 6)]).assign(feature_cache=True, train_flip=False, pool="avg")
    path = tmp_path / "mixed.csv"
    pd.concat([base, ablation]).to_csv(path, index=False)
    with caplog.at_level(logging.WARNING, logger="pacx.eval.results"):
        df = load_results(path)
    warned = [r.getMessage() for r in caplog.records if "protocol" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert "tb pacx linear_probe 1" in warned[0] and "train_flip ['False', 'True']" in warned[0]
    assert "pool ['avg', 'cls']" in warned[0] and "nih" not in warned[0] and "feature_cache" not in warned[0]
    stat = _stat(aggregate(df), "tb", "pacx")
    assert stat["n"] == 7 and stat["mean"] == pytest.approx(np.mean([0.92] * 5 + [0.80] * 2))

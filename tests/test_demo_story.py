"""The demo's closing lines: the claim per upstream seed, and the story read from the run outputs."""

import json

import pandas as pd
import pytest

from pacx.demo.claim import claim_lines, per_upstream, upstream_seed
from pacx.demo.story import TASKS, alignment_lines, ceiling_line, health_lines, last_value


def _results() -> pd.DataFrame:
    rows = [{"benchmark": "chexchonet", "backbone_kind": "pacx", "train_fraction": f, "metric_value": v,
             "test/auroc": v, "backbone_weights": f"/x/exports/pacx_encoder_s{u}.safetensors"}
            for u, vals in enumerate([(0.80, 0.82), (0.70, 0.72), (0.55, 0.57)])
            for f, v in zip((1.0, 1.0), vals)]
    rows.append({"benchmark": "chexchonet", "backbone_kind": "pacx", "train_fraction": 0.01,
                 "metric_value": 0.1, "test/auroc": 0.1,
                 "backbone_weights": "/x/exports/pacx_encoder_s0.safetensors"})  # low-data: not compared
    return pd.DataFrame(rows)


def test_per_upstream_means_over_probe_seeds():
    assert upstream_seed("a/pacx_encoder_s12.safetensors") == 12 and upstream_seed("mae.safetensors") is None
    assert per_upstream(_results(), "chexchonet") == pytest.approx({0: 0.81, 1: 0.71, 2: 0.56})
    # the column the table reports (chexchonet: test/auroc in the demo), not the paper metric's value
    other = _results().assign(**{"test/auroc": lambda d: d["metric_value"] + 0.1, "metric_value": 0.0})
    assert per_upstream(other, "chexchonet", "test/auroc") == pytest.approx({0: 0.91, 1: 0.81, 2: 0.66})


def test_claim_lines_compare_each_upstream_seed():
    table = {"chexchonet": {"mae": {"metric": "auroc", "mean": 0.60, "std": 0.01, "n": 2},
                            "pacx": {"metric": "auroc", "mean": 0.693, "std": 0.08, "n": 6, "n_upstream": 3}},
             "covidqu_seg": {"random": {"metric": "iou", "mean": 0.80, "std": 0.0, "n": 2},
                             "mae": {"metric": "iou", "mean": 0.82, "std": 0.004, "n": 2},
                             "pacx": {"metric": "iou", "mean": 0.815, "std": 0.002, "n": 6, "n_upstream": 3}}}
    lines = claim_lines(table, TASKS, _results())
    physiology = next(i for i, line in enumerate(lines) if "claim [chexchonet" in line)
    assert "difference +0.093" in lines[physiology] and "did NOT hold" not in lines[physiology]
    assert "(n=6, 3 upstream)" in lines[physiology]
    assert lines[physiology + 1].strip() == ("per Stage 2 seed, PaCX-MAE − MAE: s0 +0.210, s1 +0.110, s2 "
                                             "-0.040 (2 of 3 above MAE)")
    assert any("MAE ≥ random init: MAE 0.820 vs random 0.800 → held" in line for line in lines)
    assert any("claim [covidqu_seg, structure]: PaCX-MAE ≈ MAE" in line and "→ held" in line
               for line in lines)


def test_story_reads_the_run_outputs(tmp_path):
    s1, s2 = tmp_path / "stage1_mae", tmp_path / "stage2_pacx_s0"
    s1.mkdir(), s2.mkdir()
    pd.DataFrame({"epoch": [0, 1], "val/online_probe_auroc": [0.52, 0.55]}).to_csv(s1 / "metrics.csv",
                                                                                   index=False)
    pd.DataFrame({"epoch": [0, 0, 1], "val/infonce_frac_labs": [0.99, None, 0.97],
                  "val/infonce_frac_ecg": [1.0, None, 1.0], "val/split_top5_cxr_labs": [0.03, None, 0.06],
                  "val/effective_rank": [30.0, None, 40.5], "val/emb_std": [0.07, None, 0.075],
                  "val/online_probe_auroc": [0.6, None, 0.8]}).to_csv(
        s2 / "metrics.csv", index=False)
    assert last_value(s2 / "metrics.csv", "val/infonce_frac_labs") == 0.97
    lines = health_lines(s1, [s2])
    assert lines[0].endswith("AUROC (physiology label) 0.550")
    assert ("labs 0.970, ECG 1.000" in lines[1] and "top-5 CXR→labs 0.060" in lines[1]
            and "AUROC 0.800" in lines[1])
    alignment = {"mae": {"labs": {"r2": -0.1}, "ecg": {"r2": -0.2}},
                 "pacx_u0": {"labs": {"r2": 0.1}, "ecg": {"r2": 0.0}},
                 "pacx_u1": {"labs": {"r2": 0.3}, "ecg": {"r2": 0.0}}}
    zero = {f"pacx_u{u}": {"zero_shot": {"group_size": 10, "n_queries": 100, "chance": 0.1, "cxr_labs_acc": a,
                                         "cxr_ecg_acc": 0.1}} for u, a in enumerate((0.2, 0.3))}
    text = "\n".join(alignment_lines(alignment, zero))
    assert "mae labs -0.100 / ECG -0.200" in text and "pacx labs 0.200 ± 0.141" in text
    assert "leave-one-out" not in text  # probes without the cv entries: no line for them
    for res, r2, alpha in ((alignment["mae"], -0.01, 1e6), (alignment["pacx_u0"], 0.02, 1e4),
                           (alignment["pacx_u1"], 0.01, 1e4)):
        res["labs"]["cv"] = {"r2": r2, "alpha": alpha}
        res["ecg"]["cv"] = {"r2": 0.0, "alpha": 3162.2776601683795}
    cv_line = alignment_lines(alignment, zero)[1]
    assert cv_line.startswith("alignment ridge R², alpha by leave-one-out on the fit rows: ")
    assert ("mae labs -0.010 / ECG 0.000 (alpha 1e+06 / 3162.28)" in cv_line
            and "pacx labs 0.015 ± 0.007 / ECG 0.000 ± 0.000 (alpha 10000 / 3162.28)" in cv_line)
    assert "1-of-10 on 100 queries per Stage 2 seed (chance 0.10): CXR→labs 0.25 ± 0.07" in text
    (tmp_path / "ceiling.json").write_text(json.dumps({"img_size": 64, "benchmark": "chexchonet", "pca": 50,
                                                      "auroc": 0.9097}))
    assert "AUROC 0.910" in ceiling_line(tmp_path / "ceiling.json")[0]

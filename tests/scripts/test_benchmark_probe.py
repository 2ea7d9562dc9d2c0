"""scripts/benchmark_probe.py on a tiny setting: the three protocols run and the
JSON holds what it promises."""

from __future__ import annotations

import json
import math

import pandas as pd

from tests.helpers import load_script


def test_benchmark_probe_writes_ratio_and_both_aurocs(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert load_script("benchmark_probe").main(
        ["--arch", "vit_test", "--img-size", "32", "--n", "60", "--epochs", "2", "--release-px", "48",
         "--batch-size", "8", "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ratio"] == result["seconds_per_epoch"] / result["seconds_cached"]
    assert result["ratio_flip"] == result["seconds_per_epoch"] / result["seconds_flip"]
    for key in ("auroc_cached", "auroc_per_epoch", "auroc_flip"):
        assert 0.0 <= result[key] <= 1.0 and math.isfinite(result[key]), key
    assert result["auroc_flip_diff"] == abs(result["auroc_flip"] - result["auroc_per_epoch"])
    sizes = result["splits"]
    assert sum(sizes.values()) == 60
    assert result["bound"] == (2 * (sizes["train"] + sizes["val"]) + sizes["test"]) / 60
    assert result["bound_flip"] == ((2 * (sizes["train"] + sizes["val"]) + sizes["test"])
                                    / (60 + sizes["train"]))
    assert "ratio_flip" in capsys.readouterr().out
    rows = {name: pd.read_csv(tmp_path / "work" / name / "results.csv").iloc[0]
            for name in ("cached", "flip")}
    assert not rows["cached"]["train_flip"] and rows["flip"]["train_flip"] and rows["flip"]["feature_cache"]

"""scripts/benchmark_probe.py on a tiny setting: both protocols run and the JSON holds what it promises."""

from __future__ import annotations

import json
import math

from tests.helpers import load_script


def test_benchmark_probe_writes_ratio_and_both_aurocs(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert load_script("benchmark_probe").main(
        ["--arch", "vit_test", "--img-size", "32", "--n", "60", "--epochs", "2", "--release-px", "48",
         "--batch-size", "8", "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ratio"] == result["seconds_per_epoch"] / result["seconds_cached"]
    for key in ("auroc_cached", "auroc_per_epoch"):
        assert 0.0 <= result[key] <= 1.0 and math.isfinite(result[key]), key
    sizes = result["splits"]
    assert sum(sizes.values()) == 60
    assert result["bound"] == (2 * (sizes["train"] + sizes["val"]) + sizes["test"]) / 60
    assert "ratio" in capsys.readouterr().out
    assert (tmp_path / "work" / "cached" / "results.csv").is_file()

"""scripts/benchmark_data.py on a tiny setting: it runs end to end and writes the JSON it promises."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_writes_json(tmp_path, capsys):
    out = tmp_path / "results" / "out.json"  # a folder not there yet: created, not a crash at the end
    load_script("benchmark_data").main(["--num-images", "32", "--batch-size", "8", "--num-workers", "0",
                                        "--repeats", "2",
                        "--cache-size", "64", "--img-size", "56", "--workdir", str(tmp_path / "work"),
                        "--json", str(out)])
    result = json.loads(out.read_text())
    for key in ("pil_images_per_s", "cache_images_per_s", "ratio", "cache_worker_float_images_per_s",
                "cache_uint8_to_device_images_per_s"):
        assert result[key] > 0, key
    assert result["ratio"] == result["cache_images_per_s"] / result["pil_images_per_s"]
    assert (result["num_workers"], result["batch_size"], result["num_images"]) == (0, 8, 32)
    printed = capsys.readouterr().out
    assert "ratio cache / pil" in printed and "images/s" in printed

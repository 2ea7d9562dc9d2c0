"""The demo (plans/demo.yaml, --quick) end to end through the reproduction executor: every node runs, the
table and figures exist with finite metrics, the upstream seeds are pooled, the story lines are there, the
encoders load, and a re-run skips finished work. It checks the pipeline, not the paper's claim."""

import json
import math

import pandas as pd
import torch
from PIL import Image

import pacx
from pacx.demo import PLAN, run_demo
from pacx.demo.story import BACKBONES, TASKS
from pacx.reproduce.plan import load_plan


def test_quick_demo_end_to_end(tmp_path):
    summary = run_demo(tmp_path, quick=True, wandb="disabled", jobs=2)  # as make demo: Stage 3 two at a time
    nodes = summary["nodes"]
    assert list(nodes) == list(load_plan(PLAN, out=tmp_path, profile="quick").nodes)
    assert {n["status"] for n in nodes.values()} == {"completed"}, nodes
    assert (nodes["stage2"]["points"] == 2 and nodes["stage3"]["points"] == 16
            and nodes["seg_pacx"]["points"] == 2)
    for name in ("stage1_mae", "labs_dae", "ecg_teacher", "stage2_pacx_s0", "stage2_pacx_s1"):
        assert json.loads((tmp_path / name / "run.json").read_text())["status"] == "completed", name

    table = json.loads((tmp_path / "table.json").read_text())
    assert set(table) == {t.benchmark for t in TASKS}
    for task, row in table.items():
        assert set(row) == set(BACKBONES), task
        for cell in row.values():
            assert math.isfinite(cell["mean"]) and math.isfinite(cell["std"]), (task, cell)
        # 2 probe seeds each; PaCX-MAE pools 2 Stage 2 seeds x 1 probe seed
        assert {k: (c["n"], c["n_upstream"]) for k, c in row.items()} == {"random": (2, 1), "mae": (2, 1),
                                                                          "pacx": (2, 2)}, task
    assert table["chexchonet"]["pacx"]["metric"] == "auroc"
    results = pd.read_csv(tmp_path / "stage3" / "results.csv")
    assert set(results["train_fraction"].dropna()) == {1.0, 0.1} and results["metric_value"].notna().all()
    text = (tmp_path / "table.md").read_text()
    assert "PaCX-MAE" in text and "claim [chexchonet, physiology]" in text and "per Stage 2 seed" in text
    for line in ("zero-shot 1-of-10", "alignment ridge R²", "Stage 1 MAE: online probe AUROC",
                 "Stage 2 stage2_pacx_s1: val InfoNCE/chance labs",
                 "ceiling: logistic regression on the raw 64 px"):
        assert line in text, line
    metrics = pd.read_csv(tmp_path / "stage2_pacx_s0" / "metrics.csv")
    assert metrics["val/online_probe_auroc"].notna().any() and metrics["val/effective_rank"].notna().any()

    files = summary["outputs"]
    for key in ("rollout", "low_data"):
        with Image.open(files[key]) as img:
            assert img.width > 100 and img.height > 100, key
    assert files["reconstructions"].endswith(".png")
    report = (tmp_path / "report.html").read_text()  # the last node: every section's input is there
    assert files["report"] == str(tmp_path / "report.html") and "not available" not in report
    assert report.count('class="stat') == sum(len(row) for row in table.values())
    alignment = json.loads((tmp_path / "alignment.json").read_text())
    assert (set(alignment) == {"random", "mae", "pacx_u0", "pacx_u1"}
            and math.isfinite(alignment["pacx_u0"]["ecg"]["r2"]))
    zero_shot = json.loads((tmp_path / "zero_shot.json").read_text())["pacx_u1"]["zero_shot"]
    assert 0.0 <= zero_shot["cxr_ecg_acc"] <= 1.0 and zero_shot["chance"] == 0.1

    mae = pacx.load_encoder(files["mae_encoder"])
    distilled = pacx.load_encoder(files["pacx_encoder_s0"])
    x = torch.zeros(1, 3, 64, 64)
    assert mae(x).shape == distilled(x).shape == (1, 128) and not torch.equal(mae(x), distilled(x))

    mtime = (tmp_path / "stage1_mae" / "checkpoints" / "last.ckpt").stat().st_mtime
    rows = len(results)
    seconds = nodes["stage3"]["seconds"]
    again = run_demo(tmp_path, quick=True, wandb="disabled", only=["stage1", "stage3"])  # finished: skipped
    assert (tmp_path / "stage1_mae" / "checkpoints" / "last.ckpt").stat().st_mtime == mtime
    assert again["nodes"]["stage3"] == {"status": "done", "points": 16, "seconds": seconds}
    assert len(pd.read_csv(tmp_path / "stage3" / "results.csv")) == rows

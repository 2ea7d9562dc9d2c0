"""The demo pipeline (--quick): every step runs, outputs are usable, and a re-run skips finished steps."""

import json

import torch

import pacx
from pacx.demo import STEPS, run_demo


def test_quick_demo_end_to_end(tmp_path):
    summary = run_demo(tmp_path, quick=True, wandb="disabled")
    assert list(summary) == [s.name for s in STEPS]
    info = json.loads((tmp_path / "stage1_mae" / "run.json").read_text())
    assert info["status"] == "completed" and info["global_step"] == 2 * (256 // 128)
    assert summary["stage1"]["reconstructions"].endswith(".png")
    enc = pacx.load_encoder(summary["export"]["mae_encoder"])
    assert enc(torch.zeros(1, 3, 64, 64)).shape == (1, 128)
    mtime = (tmp_path / "stage1_mae" / "checkpoints" / "last.ckpt").stat().st_mtime
    run_demo(tmp_path, quick=True, wandb="disabled", only=["stage1"])  # finished: skipped, not retrained
    assert (tmp_path / "stage1_mae" / "checkpoints" / "last.ckpt").stat().st_mtime == mtime

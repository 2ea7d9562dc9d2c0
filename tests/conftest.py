"""Shared fixtures: synthetic releases in the real layouts, tiny models, and a finished tiny Stage 1 run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the Stage scripts

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def chexpert_release(tmp_path_factory) -> Path:
    """A CheXpert-v1.0-small release (96x80 JPEGs) with train.csv / valid.csv."""
    from pacx.testing.chexpert import write_chexpert_release

    root = tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small"
    return write_chexpert_release(root, n_train=48, n_valid=16, seed=0, width=96, height=80)


@pytest.fixture(scope="module")
def tb(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic TB (Shenzhen) release and its converted manifests: ``(raw root, manifest dir)``."""
    from pacx.data.prepare import run_converter
    from pacx.testing.benchmarks import RELEASE_WRITERS

    base = tmp_path_factory.mktemp("tb")
    raw = RELEASE_WRITERS["tb"](base / "raw", 0)
    run_converter("tb", raw, base / "manifests")
    return raw, base / "manifests"


def stage1_args(run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    """``fit`` on the demo config shrunk to the test architecture, a few steps, no workers."""
    return [
        "fit", "--config", str(REPO / "configs/demo/stage1_mae.yaml"),
        "--data.root", str(data_root), "--trainer.default_root_dir", str(run_dir),
        "--model.arch", "mae_vit_test", "--data.img_size", "32",
        "--data.batch_size", "8", "--data.num_workers", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--wandb", "disabled", *extra,
    ]


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory, chexpert_release) -> Path:
    """A finished 2-step Stage 1 run directory (no debug flags: later stages accept it as their input)."""
    from Stage1_MAE import main

    run_dir = tmp_path_factory.mktemp("runs") / "stage1"
    main(stage1_args(run_dir, chexpert_release, "--trainer.max_steps", "2", "--trainer.val_check_interval",
                     "2"))
    return run_dir

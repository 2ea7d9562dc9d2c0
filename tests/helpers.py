"""Helpers the tests share (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as a module (registered in ``sys.modules``: dataclasses need that)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The paper's Stage 2 settings where the demo config departs from them (configs/demo/stage2_pacx.yaml explains
# why): for tests that check the LoRA path or compare against the raw teacher embeddings.
PAPER_STAGE2 = ("--model.init_args.tuning", "lora", "--model.init_args.teacher_norm", "raw",
                "--model.init_args.teacher_components", "null", "--model.init_args.head_norm", "false")


def stage2_args(run: Path, root: Path, init: Path, *extra: str) -> list[str]:
    """``Stage2_PACX.py fit`` on a synthetic Symile release: the demo config at test size (vit_test, 32 px,
    16-d shared space, the release teachers' 1024-d ECG features)."""
    return ["fit", "--config", str(REPO / "configs/demo/stage2_pacx.yaml"), "--data.root", str(root),
            "--trainer.default_root_dir", str(run), "--model.init_args.init_encoder", str(init),
            "--model.init_args.encoder_arch", "vit_test",
            "--model.init_args.shared_dim", "16", "--model.init_args.teacher_dims", "{ecg: 1024}",
            "--data.img_size", "32", "--data.batch_size", "8", "--data.num_workers", "0",
            "--trainer.enable_progress_bar", "false", "--wandb", "disabled", "--trainer.log_every_n_steps",
            "1", *extra]

"""The built-in demo: every stage on generated data, on CPU (``make demo``).

    python -m pacx.demo --out demo_runs [--quick]

A pipeline of named steps run in order; later stages append their steps to :data:`STEPS`. Each step
skips itself when its output is already complete, so an interrupted demo continues where it stopped
(a half-finished training run resumes from its ``last.ckpt``). At present: generate a CheXpert-layout
dataset → Stage 1 MAE → export the encoder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pacx.utils import write_json_atomic

log = logging.getLogger("pacx.demo")

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class DemoContext:
    out: Path
    configs: Path
    quick: bool
    seed: int = 0
    wandb: str = "offline"
    results: dict = field(default_factory=dict)

    @property
    def chexpert_root(self) -> Path:
        return self.out / "data" / "chexpert" / "CheXpert-v1.0-small"


@dataclass(frozen=True)
class Step:
    name: str
    description: str
    run: Callable[[DemoContext], dict]


STEPS: list[Step] = []


def step(name: str, description: str):
    def deco(fn: Callable[[DemoContext], dict]):
        STEPS.append(Step(name, description, fn))
        return fn

    return deco


def run_completed(run_dir: Path) -> bool:
    info = run_dir / "run.json"
    return info.is_file() and json.loads(info.read_text()).get("status") == "completed"


def stage_args(ctx: DemoContext, config: str, run_dir: Path, *overrides: str) -> list[str]:
    """Arguments of a Stage CLI ``fit``; resumes from ``last.ckpt`` when an earlier try left one."""
    args = ["fit", "--config", str(ctx.configs / "demo" / config), "--trainer.default_root_dir", str(run_dir),
            "--seed_everything", str(ctx.seed), "--wandb", ctx.wandb, *overrides]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        args += ["--ckpt_path", "last"]
    return args


# ---- steps -----------------------------------------------------------------------------------------


@step("data", "generate the CheXpert-layout image set")
def generate_data(ctx: DemoContext) -> dict:
    from pacx.data.synthetic.chexpert import write_chexpert_release

    root = ctx.chexpert_root
    n_train, n_valid = (256, 64) if ctx.quick else (2000, 200)
    if not (root / "valid.csv").is_file():
        write_chexpert_release(root, n_train=n_train, n_valid=n_valid, seed=ctx.seed, width=96, height=80)
    return {"chexpert": str(root)}


@step("stage1", "Stage 1: MAE pretraining of the small ViT")
def stage1(ctx: DemoContext) -> dict:
    run_dir = ctx.out / "stage1_mae"
    if not run_completed(run_dir):
        from Stage1_MAE import main as stage1_main

        overrides = ["--trainer.max_epochs", "2"] if ctx.quick else []
        stage1_main(stage_args(ctx, "stage1_mae.yaml", run_dir, "--data.root", str(ctx.chexpert_root), *overrides))
    info = json.loads((run_dir / "run.json").read_text())
    recon = sorted((run_dir / "reconstructions").glob("*.png"))
    return {"run_dir": str(run_dir), "val_loss": info["checkpoints"].get("best_score"),
            "reconstructions": str(recon[-1]) if recon else None}


@step("export", "export the Stage 1 encoder to safetensors")
def export_stage1(ctx: DemoContext) -> dict:
    from pacx.encoders import export_encoder

    out = ctx.out / "exports" / "mae_encoder.safetensors"
    export_encoder(ctx.out / "stage1_mae", out)
    return {"mae_encoder": str(out)}


# ---- driver ----------------------------------------------------------------------------------------


def run_demo(out: str | Path, quick: bool = False, configs: str | Path = REPO_CONFIGS, wandb: str = "offline",
             only: list[str] | None = None) -> dict:
    ctx = DemoContext(Path(out), Path(configs), quick, wandb=wandb)
    ctx.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(configs).resolve().parent))  # the Stage scripts live beside configs/
    summary = {}
    for s in STEPS:
        if only and s.name not in only:
            continue
        log.info("demo step %s: %s", s.name, s.description)
        t0 = time.perf_counter()
        ctx.results[s.name] = s.run(ctx)
        summary[s.name] = {"seconds": round(time.perf_counter() - t0, 1), **ctx.results[s.name]}
        write_json_atomic(ctx.out / "demo_summary.json", summary)
    lines = [f"{'step':<10} {'seconds':>8}  outputs"]
    for name, res in summary.items():
        outputs = ", ".join(f"{k}={v}" for k, v in res.items() if k != "seconds")
        lines.append(f"{name:<10} {res['seconds']:>8}  {outputs}")
    sys.stdout.write("\n".join(lines) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Run the pacx demo pipeline on generated data.")
    parser.add_argument("--out", default="demo_runs", help="output directory (default demo_runs)")
    parser.add_argument("--quick", action="store_true", help="a reduced, faster version")
    parser.add_argument("--configs", default=str(REPO_CONFIGS), help="the repository's configs/ directory")
    parser.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    parser.add_argument("--only", nargs="*", help="run only these steps")
    args = parser.parse_args(argv)
    run_demo(args.out, args.quick, args.configs, args.wandb, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())

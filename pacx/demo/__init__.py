"""The built-in demo: all three stages on the generated physiology phantom, on CPU (``make demo``).

    python -m pacx.demo --out demo_runs [--quick] [--no-progress]

A pipeline of named steps (:mod:`pacx.demo.steps`) run in order: generate the phantom
(:mod:`pacx.demo.phantom`) → Stage 1 MAE → the demo teachers (the paper's Labs DAE; ECGFounder
``demo_small`` pretrained by self-supervision on the phantom ECGs) → teacher features → Stage 2 PaCX
distillation → exports → Stage 3 (random | MAE | PaCX-MAE on the physiology, nodule and lung tasks,
seeds, the 1 % regime) → alignment probe → figures → the paper-style table (``table.json``) → the static
report ``report.html`` (:mod:`pacx.eval.report`).

Every stage runs through its ``Stage*.py`` CLI (the teachers through ``python -m pacx.teachers``) with a
``configs/demo/*.yaml``, the scripts through their ``main``: no private code path. Each step skips itself
when its output is already complete, so an interrupted demo continues where it stopped (a half-finished
training run resumes from ``last.ckpt``).
``--quick`` runs the same steps on the ``quick`` phantom with fewer epochs and seeds. Each step logs
``[i/n] <step>`` as it starts and ends; inside it the usual bars (:mod:`pacx.progress`) show on a terminal,
the Lightning ones as each config says, and none with ``--no-progress``.
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

from pacx.progress import NO_PROGRESS_HELP, progress_enabled, set_progress
from pacx.utils import write_json_atomic

log = logging.getLogger("pacx.demo")

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class DemoScale:
    """What ``--quick`` shrinks: phantom preset, epochs per stage (None = the config's), Stage 2 (upstream)
    seeds, Stage 3 (probe) seeds for random init and MAE (``seeds``) and for each PaCX-MAE encoder
    (``upstream_probe_seeds``). Stage 1 and the teachers are shared by every Stage 2 seed."""

    phantom: str
    stage1_epochs: int | None
    labs_dae_epochs: int | None
    ecg_teacher_epochs: int | None
    stage2_epochs: int | None
    probe_epochs: int | None
    seg_epochs: int | None
    seeds: tuple[int, ...]
    fractions: tuple[float, ...]
    stage2_seeds: tuple[int, ...]
    upstream_probe_seeds: tuple[int, ...]


SCALES: dict[bool, DemoScale] = {
    False: DemoScale("full", None, None, None, None, None, None, (0, 1), (1.0, 0.01), (0, 1, 2), (0,)),
    True: DemoScale("demo_quick", 2, 5, 1, 2, 5, 2, (0, 1), (1.0, 0.1), (0, 1), (0,)),
}


@dataclass
class DemoContext:
    out: Path
    configs: Path
    quick: bool
    seed: int = 0
    wandb: str = "offline"
    results: dict = field(default_factory=dict)

    @property
    def scale(self) -> DemoScale:
        return SCALES[self.quick]

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def exports(self) -> Path:
        return self.out / "exports"

    @property
    def symile(self) -> Path:
        return self.data / "symile" / "data_npy"


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


def stage_args(ctx: DemoContext, config: str | tuple[str, ...], run_dir: Path, *overrides: str,
               epochs: int | None = None) -> list[str]:
    """Arguments of a Stage CLI ``fit`` (``config``: one file under ``configs/demo`` or several, stacked in order);
    resumes from ``last.ckpt`` when an earlier try left one."""
    configs = (config,) if isinstance(config, str) else config
    args = ["fit", *(a for c in configs for a in ("--config", str(ctx.configs / "demo" / c))),
            "--trainer.default_root_dir", str(run_dir), "--seed_everything", str(ctx.seed), "--wandb", ctx.wandb,
            *overrides]
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs)]
    if not progress_enabled():  # no terminal, or --no-progress: no Lightning bars either
        args += ["--trainer.enable_progress_bar", "false"]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        args += ["--ckpt_path", "last"]
    return args


def run_stage(script: str, args: list[str]) -> None:
    """``<script>.main(args)`` of a training entry point (``Stage1_MAE``, ``Stage2_PACX``, ``Stage3_eval``, the teachers'
    ``pacx.teachers.train``)."""
    import importlib

    importlib.import_module(script).main(args)


# ---- driver ----------------------------------------------------------------------------------------


def run_demo(out: str | Path, quick: bool = False, configs: str | Path = REPO_CONFIGS, wandb: str = "offline",
             only: list[str] | None = None) -> dict:
    from pacx.demo import steps  # noqa: F401  (registers the steps)

    ctx = DemoContext(Path(out), Path(configs), quick, wandb=wandb)
    ctx.out.mkdir(parents=True, exist_ok=True)
    repo = str(Path(configs).resolve().parent)  # the Stage scripts live beside configs/
    if repo not in sys.path:
        sys.path.insert(0, repo)
    summary_path = ctx.out / "demo_summary.json"
    summary = json.loads(summary_path.read_text()) if only and summary_path.is_file() else {}
    selected = [s for s in STEPS if not only or s.name in only]
    for i, s in enumerate(selected, 1):
        log.info("[%d/%d] %s: %s", i, len(selected), s.name, s.description)
        t0 = time.perf_counter()
        ctx.results[s.name] = s.run(ctx)
        summary[s.name] = {"seconds": round(time.perf_counter() - t0, 1), **ctx.results[s.name]}
        log.info("[%d/%d] %s done in %.1f s", i, len(selected), s.name, summary[s.name]["seconds"])
        write_json_atomic(summary_path, summary)
    lines = [f"{'step':<12} {'seconds':>8}  outputs"]
    for name, res in summary.items():
        outputs = ", ".join(f"{k}={v}" for k, v in res.items() if k not in ("seconds", "table"))
        lines.append(f"{name:<12} {res['seconds']:>8}  {outputs}")
    table = summary.get("table", {}).get("table")
    report = summary.get("report", {}).get("report")
    sys.stdout.write("\n".join(lines) + "\n" + (f"\n{table}\n" if table else "")
                     + (f"\nreport: {report}\n" if report else ""))
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Run the pacx demo pipeline on the generated phantom.")
    parser.add_argument("--out", default="demo_runs", help="output directory (default demo_runs)")
    parser.add_argument("--quick", action="store_true", help="a reduced, faster version (about 3 minutes)")
    parser.add_argument("--configs", default=str(REPO_CONFIGS), help="the repository's configs/ directory")
    parser.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    parser.add_argument("--only", nargs="*", help="run only these steps")
    parser.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    args = parser.parse_args(argv)
    if args.no_progress:
        set_progress(False)
    run_demo(args.out, args.quick, args.configs, args.wandb, args.only)
    return 0

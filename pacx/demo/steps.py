"""The demo's steps, in pipeline order (registered with :func:`pacx.demo.step`; run by :func:`pacx.demo.run_demo`).

Each returns a small dict of outputs for ``demo_summary.json`` and skips work whose output is complete.
Stage 3 runs are described by :data:`TASKS` (one entry per phantom task: benchmark, config, image root).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pacx.demo import DemoContext, run_completed, run_stage, stage_args, step

log = logging.getLogger("pacx.demo")

DEMO_ARCH = "vit_demo"  # the architecture of the demo's random-init baseline (the Stage 1 encoder's)
DEMO_IMG_SIZE = 64
PHYSIOLOGY_LABEL = "composite_slvh_dlv"  # the phantom CheXchoNet label (cardiac size / LV hypertrophy)
ECG_CONFIG = "demo_small"  # the demo ECG teacher's named ECGFounder config


@dataclass(frozen=True)
class DemoTask:
    """One Stage 3 task of the demo: a phantom release converted by the benchmark's own converter."""

    benchmark: str
    config: tuple[str, ...]  # configs/demo/<config>, stacked in order (a base, then the task's override)
    image_root: str  # the image root under the release folder ("" = the release folder)
    kind: str  # physiology | finding | structure (what the task probes)
    fractions: bool  # run the low-data regime too
    metric_column: str | None = None  # tabulate by this logged metric instead of the paper metric


TASKS: tuple[DemoTask, ...] = (
    # echo-derived composite label, like CheXchoNet's: the physiology-dense task. AUROC rather than the paper's
    # F1 at 0.5: a 28 %-prevalence label and a probe head make F1 mostly a threshold effect.
    DemoTask("chexchonet", ("stage3_linear_probe.yaml", "stage3_chexchonet.yaml"), "", "physiology", True, "test/auroc"),
    DemoTask("tb", ("stage3_linear_probe.yaml", "stage3_tb.yaml"), "", "finding", True),  # nodule present: a plain finding
    DemoTask("covidqu_seg", ("stage3_covidqu_seg.yaml",), "Lung Segmentation Data/Lung Segmentation Data",
             "structure", False),  # lungs
)
BACKBONES = ("random", "mae", "pacx")


def run_script(ctx: DemoContext, name: str, argv: list[str]) -> int:
    """``scripts/<name>.py``'s ``main(argv)`` (the scripts live beside ``configs/``)."""
    path = ctx.configs.resolve().parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pacx_demo_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main(argv)


# ---- data ------------------------------------------------------------------------------------------


@step("phantom", "generate the physiology phantom and convert its Stage 3 releases")
def phantom(ctx: DemoContext) -> dict:
    from pacx.data.prepare import run_converter
    from pacx.demo.phantom.generate import SUMMARY_FILE, generate_phantom

    if not (ctx.data / SUMMARY_FILE).is_file():
        generate_phantom(ctx.data, seed=ctx.seed, sizes=ctx.scale.phantom, overwrite=True)
    for task in TASKS:
        out = ctx.out / "manifests" / task.benchmark
        if not (out / "summary.json").is_file() and not any(out.glob("*.csv")):
            run_converter(task.benchmark, ctx.data / task.benchmark, out)
    return {"data": str(ctx.data), "preset": ctx.scale.phantom}


# ---- Stage 1 ---------------------------------------------------------------------------------------


@step("stage1", "Stage 1: MAE pretraining of the small ViT")
def stage1(ctx: DemoContext) -> dict:
    run_dir = ctx.out / "stage1_mae"
    if not run_completed(run_dir):
        root = ctx.data / "chexpert" / "CheXpert-v1.0-small"
        run_stage("Stage1_MAE", stage_args(ctx, "stage1_mae.yaml", run_dir, "--data.root", str(root),
                                           *online_probe_args(ctx, 4),
                                           epochs=ctx.scale.stage1_epochs))
    info = json.loads((run_dir / "run.json").read_text())
    recon = sorted((run_dir / "reconstructions").glob("*.png"))
    return {"run_dir": str(run_dir), "val_loss": info["checkpoints"].get("best_score"),
            "reconstructions": str(recon[-1]) if recon else None}


@step("export", "export the Stage 1 encoder to safetensors")
def export_stage1(ctx: DemoContext) -> dict:
    from pacx.encoders import export_encoder

    out = ctx.exports / "mae_encoder.safetensors"
    if not out.is_file():
        export_encoder(ctx.out / "stage1_mae", out)
    return {"mae_encoder": str(out)}


# ---- Stage 2: teachers, features, distillation -------------------------------------------------------


@step("labs_dae", "Stage 2 teacher: the paper's Labs DAE on the phantom labs")
def labs_dae(ctx: DemoContext) -> dict:
    run_dir = ctx.out / "labs_dae"
    if not run_completed(run_dir):
        run_stage("pacx.teachers.train", stage_args(ctx, "labs_dae.yaml", run_dir, "--data.root", str(ctx.symile),
                                            epochs=ctx.scale.labs_dae_epochs))
    return {"run_dir": str(run_dir)}


@step("ecg_teacher", "Stage 2 teacher: ECGFounder demo_small, self-supervised on the phantom ECGs")
def ecg_teacher(ctx: DemoContext) -> dict:
    from pacx.models.ecg_ssl import export_ecg_teacher

    run_dir = ctx.out / "ecg_teacher"
    if not run_completed(run_dir):
        run_stage("pacx.teachers.train", stage_args(ctx, "ecg_teacher.yaml", run_dir, "--data.root", str(ctx.symile),
                                            epochs=ctx.scale.ecg_teacher_epochs))
    out = ctx.exports / "ecg_teacher.safetensors"
    if not out.is_file():
        export_ecg_teacher(run_dir, out)
    return {"run_dir": str(run_dir), "ecg_teacher": str(out)}


@step("features", "teacher features for Stage 2 (ecg_features.npy, labs_features.npy)")
def features(ctx: DemoContext) -> dict:
    run_script(ctx, "extract_teacher_features", [
        "--data-root", str(ctx.symile), "--ecgfounder", str(ctx.exports / "ecg_teacher.safetensors"),
        "--ecgfounder-config", ECG_CONFIG, "--labs-dae", str(ctx.out / "labs_dae")])
    return {"data_root": str(ctx.symile)}


def stage2_run(ctx: DemoContext, seed: int) -> Path:
    return ctx.out / f"stage2_pacx_s{seed}"


def pacx_export(ctx: DemoContext, seed: int) -> Path:
    return ctx.exports / f"pacx_encoder_s{seed}.safetensors"


def online_probe_args(ctx: DemoContext, every_n_epochs: int) -> list[str]:
    """The online linear probe (:class:`pacx.lit.health.OnlineLinearProbe`) on the phantom's physiology label:
    1,000 CheXchoNet-layout train images (Stage 3's train split; its test split stays unseen), the same for
    Stage 1 and Stage 2 so their numbers compare."""
    data = {"class_path": "pacx.data.probe.ManifestProbeData", "init_args": {
        "manifest": str(ctx.out / "manifests" / "chexchonet" / "chexchonet_train.csv"),
        "image_root": str(ctx.data / "chexchonet" / "images"), "label": PHYSIOLOGY_LABEL,
        "path_column": "cxr_filename", "img_size": DEMO_IMG_SIZE, "max_samples": 1000, "seed": 0}}
    return ["--trainer.callbacks+=pacx.lit.health.OnlineLinearProbe",
            "--trainer.callbacks.every_n_epochs", str(every_n_epochs), "--trainer.callbacks.data", json.dumps(data)]


@step("stage2", "Stage 2: PaCX distillation of the Stage 1 encoder, one run per upstream seed")
def stage2(ctx: DemoContext) -> dict:
    from pacx.encoders import export_encoder

    out = {}
    for seed in ctx.scale.stage2_seeds:
        run_dir = stage2_run(ctx, seed)
        if not run_completed(run_dir):
            ctx_seed = DemoContext(ctx.out, ctx.configs, ctx.quick, seed, ctx.wandb)
            run_stage("Stage2_PACX", stage_args(
                ctx_seed, "stage2_pacx.yaml", run_dir, "--data.root", str(ctx.symile),
                "--model.init_args.init_encoder", str(ctx.exports / "mae_encoder.safetensors"),
                *online_probe_args(ctx, 5), epochs=ctx.scale.stage2_epochs))
        if not pacx_export(ctx, seed).is_file():
            export_encoder(run_dir, pacx_export(ctx, seed))
        info = json.loads((run_dir / "run.json").read_text())
        out[f"s{seed}"] = {"run_dir": str(run_dir), "pacx_encoder": str(pacx_export(ctx, seed)),
                           "val_loss": info["checkpoints"].get("best_score")}
    return out


# ---- Stage 3 ---------------------------------------------------------------------------------------


def backbone_runs(ctx: DemoContext) -> list[tuple[str, list[str], tuple[int, ...]]]:
    """``(run-name prefix, CLI args, probe seeds)`` of every Stage 3 backbone: random init and the Stage 1 MAE
    (``scale.seeds``), and one PaCX-MAE per Stage 2 seed (``pacx_u<seed>``, ``scale.upstream_probe_seeds``;
    the table pools them as ``pacx``)."""
    scale = ctx.scale
    runs = [("random", ["--model.backbone.kind", "random", "--model.backbone.arch", DEMO_ARCH], scale.seeds),
            ("mae", ["--model.backbone.kind", "mae", "--model.backbone.weights",
                     str(ctx.exports / "mae_encoder.safetensors")], scale.seeds)]
    for seed in scale.stage2_seeds:
        runs.append((f"pacx_u{seed}", ["--model.backbone.kind", "pacx", "--model.backbone.weights",
                                       str(pacx_export(ctx, seed))], scale.upstream_probe_seeds))
    return runs


def results_csv(ctx: DemoContext) -> Path:
    return ctx.out / "stage3" / "results.csv"


def finished_runs(ctx: DemoContext) -> set[str]:
    path = results_csv(ctx)
    return set(pd.read_csv(path)["run_dir"].astype(str)) if path.is_file() else set()


@step("stage3", "Stage 3: random | MAE | PaCX-MAE on the physiology, nodule and lung tasks")
def stage3(ctx: DemoContext) -> dict:
    scale, done, runs = ctx.scale, finished_runs(ctx), 0
    for task in TASKS:
        epochs = scale.probe_epochs if task.kind != "structure" else scale.seg_epochs
        fractions = scale.fractions if task.fractions else (1.0,)
        for fraction in fractions:
            for name, args, seeds in backbone_runs(ctx):
                for seed in seeds:
                    run_dir = ctx.out / "stage3" / task.benchmark / f"{name}_f{fraction:g}_s{seed}"
                    if str(run_dir) in done:
                        continue
                    extra = ["--data.train_fraction", str(fraction)] if task.fractions else []
                    if task.kind != "structure":
                        extra += ["--model.feature_cache_dir", str(ctx.out / "stage3" / "feature_cache")]
                    ctx_seed = DemoContext(ctx.out, ctx.configs, ctx.quick, seed, ctx.wandb)
                    run_stage("Stage3_eval", stage_args(
                        ctx_seed, task.config, run_dir, *args,
                        "--data.root", str(ctx.data / task.benchmark / task.image_root),
                        "--data.manifest_dir", str(ctx.out / "manifests" / task.benchmark),
                        "--model.results_csv", str(results_csv(ctx)), *extra, epochs=epochs))
                    runs += 1
    return {"results": str(results_csv(ctx)), "runs": runs}


@step("alignment", "alignment probe: CXR features → teacher embeddings (R², cosine, R@k; zero-shot)")
def alignment(ctx: DemoContext) -> dict:
    out = ctx.out / "alignment.json"
    zero_shot = ctx.out / "zero_shot.json"
    common = ["--data-root", str(ctx.symile), "--img-size", str(DEMO_IMG_SIZE), "--device", "cpu",
              "--drop-last-batch", "0"]
    pacx_runs = [(f"pacx_u{seed}", seed) for seed in ctx.scale.stage2_seeds]
    if not out.is_file():
        run_script(ctx, "eval_alignment", [
            *common, "--backbone", f"random=random:{DEMO_ARCH}",
            "--backbone", f"mae={ctx.exports / 'mae_encoder.safetensors'}",
            *[a for name, seed in pacx_runs for a in ("--backbone", f"{name}={pacx_export(ctx, seed)}")],
            "--json", str(out)])
    if not zero_shot.is_file():
        run_script(ctx, "eval_alignment", [
            *common, *[a for name, seed in pacx_runs for a in ("--backbone", f"{name}={stage2_run(ctx, seed)}")],
            "--zero-shot", "--json", str(zero_shot)])
    return {"alignment": str(out), "zero_shot": str(zero_shot)}


@step("figures", "figures: attention rollout MAE vs PaCX-MAE (the reconstructions come from Stage 1)")
def figures(ctx: DemoContext) -> dict:
    from pacx.data.registry import BENCHMARKS

    spec = BENCHMARKS["chexchonet"]
    manifest = ctx.out / "manifests" / "chexchonet" / spec.manifest_files["test"]
    out = ctx.out / "figures" / "rollout.png"
    if not out.is_file():
        run_script(ctx, "attention_rollout", [
            "--backbones", f"mae={ctx.exports / 'mae_encoder.safetensors'}",
            f"pacx={pacx_export(ctx, ctx.scale.stage2_seeds[0])}", "--images", str(manifest),
            "--path-column", spec.path_column, "--image-root", str(ctx.data / "chexchonet" / spec.image_dirs["test"]),
            "--max-images", "6", "--out", str(out)])
    return {"rollout": str(out)}


@step("ceiling", "the raw-pixel ceiling of the physiology task (logistic regression on the pixels)")
def ceiling(ctx: DemoContext) -> dict:
    out = ctx.out / "ceiling.json"
    if not out.is_file():
        run_script(ctx, "pixel_ceiling", [
            "--benchmark", "chexchonet", "--root", str(ctx.data / "chexchonet"),
            "--manifest-dir", str(ctx.out / "manifests" / "chexchonet"), "--img-size", str(DEMO_IMG_SIZE),
            "--json", str(out)])
    return {"ceiling": str(out), "auroc": round(json.loads(out.read_text())["auroc"], 4)}


@step("table", "the paper-style table (mean ± std over upstream × probe seeds), table.json, the claim, the story")
def table(ctx: DemoContext) -> dict:
    import contextlib
    import io

    from pacx.demo.claim import claim_lines
    from pacx.demo.story import alignment_lines, ceiling_line, health_lines

    buffer = io.StringIO()
    argv = [str(results_csv(ctx)), "--backbones", *BACKBONES, "--out-dir", str(ctx.out / "figures"),
            "--json", str(ctx.out / "table.json")]
    for task in TASKS:
        if task.metric_column:
            argv += ["--metric", f"{task.benchmark}={task.metric_column}"]
    with contextlib.redirect_stdout(buffer):
        run_script(ctx, "make_tables", argv)
    markdown = buffer.getvalue().split("\\begin{tabular}")[0].strip()
    results = pd.read_csv(results_csv(ctx))
    story = claim_lines(json.loads((ctx.out / "table.json").read_text()), TASKS, results)
    story += alignment_lines(json.loads((ctx.out / "alignment.json").read_text()),
                             json.loads((ctx.out / "zero_shot.json").read_text()))
    story += health_lines(ctx.out / "stage1_mae", [stage2_run(ctx, s) for s in ctx.scale.stage2_seeds])
    story += ceiling_line(ctx.out / "ceiling.json")
    text = (f"Stage 1 is shared; PaCX-MAE rows pool {len(ctx.scale.stage2_seeds)} Stage 2 seeds × "
            f"{len(ctx.scale.upstream_probe_seeds)} probe seed(s), random init and MAE {len(ctx.scale.seeds)} probe "
            "seeds.\n\n" + markdown + "\n\n" + "\n".join(story))
    (ctx.out / "table.md").write_text(text + "\n")
    low_data = ctx.out / "figures" / "low_data.png"
    return {"table_json": str(ctx.out / "table.json"), "low_data": str(low_data) if low_data.is_file() else None,
            "table": text}


@step("report", "report.html: the table, the comparison, the figures and the learning curves in one static page")
def report(ctx: DemoContext) -> dict:
    out = ctx.out / "report.html"  # rewritten every time: cheap, and it should show the latest outputs
    run_script(ctx, "make_report", [str(ctx.out), "--out", str(out)])
    return {"report": str(out)}

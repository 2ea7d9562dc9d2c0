#!/usr/bin/env python
"""Benchmark one full linear-probe protocol three ways: backbone forward every epoch vs cached features, plain
and flip-aware.

Writes a synthetic binary benchmark in the TB (Shenzhen) release layout (``--n`` PNGs of ``--release-px``
pixels; positives carry a bright disc, so the probe has something to learn), converts it with our converter,
and runs the same ``Stage3_eval.py fit`` (train ``--epochs`` epochs, validate each epoch, then test the best
checkpoint) three times on one random-init backbone:

  per_epoch  ``model.feature_cache false``: the backbone runs on every train and val batch of every epoch,
             with the docs/datasets.md#transforms train flip, as the reference does;
  cached     ``model.feature_cache plain``, cold cache: each split's features are computed once
             (deterministic transform), then the head trains on them without the flip;
  flip       ``model.feature_cache flip`` (the default), cold cache: as ``cached``, plus the features of each
             train image's horizontal flip (same decode, one more forward), and the head draws the flip per
             sample and epoch from the same seeded stream as ``per_epoch``.

All wall times cover the whole command (setup, extraction, 40 epochs, checkpoints, test). ``ratio`` is
per_epoch / cached and ``ratio_flip`` per_epoch / flip; the test AUROCs are printed (``flip`` trains the head
``per_epoch`` trains, up to float rounding, so their AUROCs agree). The cached paths cannot beat the
forward-pass bounds ``bound = (epochs × (train + val) + test) / (train + val + test)`` and ``bound_flip`` (the
same with 2 × train in the denominator); they are printed too, so the ratios can be read against them.

    python scripts/benchmark_probe.py [--arch vit_small_patch16 --img-size 112 --n 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pacx.cli import EvalCLI, cli_main
from pacx.data.prepare import run_converter
from pacx.data.registry import BENCHMARKS
from pacx.data.stage3 import SplitsDataModule
from pacx.lit.common import BenchmarkEvalModule
from pacx.testing.benchmarks import write_tb
from pacx.testing.images import simple_cxr
from pacx.utils import write_text_atomic

log = logging.getLogger("benchmark_probe")
REPO = Path(__file__).resolve().parents[1]
BENCHMARK = "tb"


def render_release(raw: Path, manifests: Path, seed: int, px: int) -> None:
    """Redraw every image of the converted manifests as a ``px`` × ``px`` PNG (release-sized files, so the
    per-epoch path pays the decode cost it pays on real data); positives get a bright disc at a random
    place."""
    spec = BENCHMARKS[BENCHMARK]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:px, :px]
    for split in ("train", "val", "test"):
        df = pd.read_csv(manifests / spec.manifest_files[split])
        for rel, label in zip(df[spec.path_column], df[spec.labels[0]]):
            img = simple_cxr(rng, px, px).astype(np.float32)
            if int(label) == 1:
                cy, cx = rng.uniform(0.25, 0.75) * px, rng.uniform(0.2, 0.8) * px
                disc = ((yy - cy) ** 2 + (xx - cx) ** 2) <= (0.15 * px) ** 2
                img[disc] = np.clip(img[disc] + 120, 0, 255)
            Image.fromarray(img.astype(np.uint8), mode="L").save(raw / spec.image_dirs[split] / str(rel))


#: protocol -> model.feature_cache
PROTOCOLS = {"per_epoch": "false", "cached": "plain", "flip": "flip"}


def protocol_args(args, raw: Path, manifests: Path, run_dir: Path, cache: Path, protocol: str) -> list[str]:
    return [
        "fit", "--config", str(REPO / "configs/stage3/linear_probe.yaml"),
        "--config", str(REPO / "configs/stage3/lp" / f"{BENCHMARK}.yaml"),
        "--model.backbone.kind", "random", "--model.backbone.arch", args.arch, "--data.img_size",
        str(args.img_size),
        "--model.feature_cache", PROTOCOLS[protocol], "--model.feature_cache_dir", str(cache),
        "--data.root", str(raw), "--data.manifest_dir", str(manifests), "--data.batch_size",
        str(args.batch_size), "--data.num_workers", str(args.num_workers), "--data.pin_memory", "false",
        "--trainer.max_epochs", str(args.epochs), "--trainer.precision", args.precision,
        "--trainer.accelerator", args.accelerator, "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run_dir), "--seed_everything", str(args.seed), "--wandb",
        "disabled",
    ]


def run_protocol(args, raw: Path, manifests: Path, work: Path, name: str) -> dict:
    run_dir = work / name
    start = time.perf_counter()
    # exactly what Stage3_eval.py's main() runs
    cli_main(BenchmarkEvalModule, SplitsDataModule,
             protocol_args(args, raw, manifests, run_dir, work / f"{name}_cache", name), cli_class=EvalCLI,
             program=REPO / "Stage3_eval.py")
    seconds = time.perf_counter() - start
    row = pd.read_csv(run_dir / "results.csv").iloc[-1]
    log.info("%s: %.1f s, test AUROC %.4f", name, seconds, row["test/auroc"])
    return {"seconds": seconds, "auroc": float(row["test/auroc"]),
            "feature_cache": bool(row["feature_cache"])}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small_patch16", help="named ViT (random init)")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--n", type=int, default=1000, help="images in the synthetic release (all splits)")
    parser.add_argument("--release-px", type=int, default=1024,
                        help="side of the written PNGs (NIH / VinDr-scale files are ~1024-3000 px)")
    parser.add_argument("--epochs", type=int, default=40,
                        help="the protocol's epochs (docs/datasets.md#stage-3-settings: 40)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (TB's LP batch is 32)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32", help="32 on CPU; bf16-mixed on a GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="pacx_probe_") as tmp:
        work = Path(args.work or tmp)
        raw = write_tb(work / "raw", args.seed, n=args.n)
        manifests = work / "manifests"
        counts = run_converter(BENCHMARK, raw, manifests) or {}
        render_release(raw, manifests, args.seed, args.release_px)
        spec = BENCHMARKS[BENCHMARK]
        sizes = {s: len(pd.read_csv(manifests / spec.manifest_files[s])) for s in ("train", "val", "test")}
        log.info("synthetic %s: %s (%s)", BENCHMARK, sizes, counts)
        warmup = argparse.Namespace(**{**vars(args), "epochs": 1})  # one-time import / init costs, untimed
        for name in PROTOCOLS:
            run_protocol(warmup, raw, manifests, work / "warmup", name)
        runs = {name: run_protocol(args, raw, manifests, work, name) for name in PROTOCOLS}

    per_epoch, cached, flip = runs["per_epoch"], runs["cached"], runs["flip"]
    tv, total = sizes["train"] + sizes["val"], sum(sizes.values())
    result = {
        "ratio": per_epoch["seconds"] / cached["seconds"],
        "ratio_flip": per_epoch["seconds"] / flip["seconds"],
        "auroc_cached": cached["auroc"],
        "auroc_flip": flip["auroc"],
        "auroc_per_epoch": per_epoch["auroc"],
        "auroc_diff": abs(cached["auroc"] - per_epoch["auroc"]),
        "auroc_flip_diff": abs(flip["auroc"] - per_epoch["auroc"]),
        "seconds_cached": cached["seconds"],
        "seconds_flip": flip["seconds"],
        "seconds_per_epoch": per_epoch["seconds"],
        "bound": (args.epochs * tv + sizes["test"]) / total,
        "bound_flip": (args.epochs * tv + sizes["test"]) / (total + sizes["train"]),
        "splits": sizes,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "work")},
    }
    sys.stdout.write(
        f"linear probe, {args.epochs} epochs, {args.arch} @ {args.img_size}px, splits {sizes}\n"
        f"  per-epoch backbone:   {per_epoch['seconds']:8.1f} s   test AUROC {per_epoch['auroc']:.4f}\n"
        f"  cached, plain:        {cached['seconds']:8.1f} s   test AUROC {cached['auroc']:.4f}\n"
        f"  cached, flip-aware:   {flip['seconds']:8.1f} s   test AUROC {flip['auroc']:.4f}\n"
        f"  ratio {result['ratio']:.1f}x (forward-pass bound {result['bound']:.1f}x), "
        f"|AUROC diff| {result['auroc_diff']:.4f}\n"
        f"  ratio_flip {result['ratio_flip']:.1f}x (forward-pass bound {result['bound_flip']:.1f}x), "
        f"|AUROC diff| {result['auroc_flip_diff']:.4f}\n"
    )
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

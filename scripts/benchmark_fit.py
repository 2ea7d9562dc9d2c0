"""Benchmark the real Stage 1 ``fit``: images/s, MFU and peak memory of ``Stage1_MAE.py fit`` as users run it.

``scripts/benchmark_train.py`` times the bare MAE step on a tensor that never changes. This script runs the
whole training loop instead, through the same CLI, config and classes as a pretraining run: the CheXpert
data module reading the uint8 image cache (crops and flips in the loader workers, normalisation on the
device), ``MAEModule`` (compiled with ``--compile``), AdamW (fused on CUDA), gradient clipping if configured,
logging. It

1. writes a CheXpert-layout release of ``--num-images`` generated JPEGs (``pacx.testing.chexpert``),
2. decodes them once into a uint8 cache at ``--cache-size`` (``pacx.data.cache``; 256 px, as
   ``scripts/build_image_cache.py`` builds the training cache for 224 px crops),
3. lists them in training manifests long enough that no epoch (and no epoch-end checkpoint) ends inside the
   timed steps,
4. runs ``Stage1_MAE.py fit --config CONFIG`` for ``--warmup`` + ``--steps`` optimizer steps without
   validation or step checkpoints, with :class:`pacx.perf.fit.StepThroughput` timing the last ``--steps``.

Its JSON (``--json``) holds the callback's result (``img_per_s``, ``mfu``, ``peak_memory_gib``, ...) and the
run's settings; ``--rates FILE`` merges the per-GPU rate into the rates file of
``scripts/reproduce_paper.py --estimate`` as ``stage1`` (docs/performance.md#fit-path). On the GPU
(issue 17's check)::

    python scripts/benchmark_fit.py --device cuda --compile --json fit.json --rates rates.json

Anything the config sets can be changed with ``-- --key value`` after the script's own arguments (passed to
the CLI as is), e.g. ``-- --model.compile_options '{mode: max-autotune-no-cudagraphs}'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository's Stage1_MAE.py and pacx
    sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pacx.data.cache import build_image_cache  # noqa: E402
from pacx.data.chexpert import IMAGE_DIRS, MANIFESTS, convert_release  # noqa: E402
from pacx.perf.fit import read_throughput  # noqa: E402
from pacx.reproduce.estimate import merge_rates  # noqa: E402
from pacx.testing.chexpert import write_chexpert_release  # noqa: E402
from pacx.utils import cores, git_sha, write_text_atomic  # noqa: E402

log = logging.getLogger("benchmark_fit")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", type=Path, default=REPO / "configs/stage1/mae_vitb_chexpert.yaml")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="trainer.accelerator (one device)")
    p.add_argument("--precision", default=None, help="trainer.precision (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="data.batch_size (default: the config's)")
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the config's)")
    p.add_argument("--arch", default=None, help="model.arch (default: the config's)")
    p.add_argument("--img-size", type=int, default=None, help="data.img_size (default: the config's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="model.compile (default: the config's)")
    p.add_argument("--num-images", type=int, default=4096, help="generated training images")
    p.add_argument("--cache-size", type=int, default=256, help="side of the cached images")
    p.add_argument("--warmup", type=int, default=20, help="optimizer steps before the clock starts")
    p.add_argument("--steps", type=int, default=200, help="timed optimizer steps")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's peak, for MFU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep the release, cache and run here")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--rates", type=Path, default=None, help="merge the per-GPU rate into this rates file")
    args, cli_extra = p.parse_known_args(argv)
    if cli_extra and cli_extra[0] == "--":
        cli_extra = cli_extra[1:]
    for name in ("num_images", "cache_size", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args, cli_extra


def prepare_data(workdir: Path, num_images: int, cache_size: int, seed: int,
                 rows: int) -> tuple[Path, Path, Path]:
    """The generated release, its uint8 training cache (keyed as the data module looks rows up) and manifests
    whose training split lists the images again and again up to ``rows`` rows, so that no epoch ends (and no
    epoch-end checkpoint is written) inside the timed steps."""
    release = workdir / "release"
    start = time.perf_counter()
    write_chexpert_release(release, n_train=num_images, n_valid=2, seed=seed)
    frames = convert_release(release)
    cache = build_image_cache(frames["train"]["Path"].astype(str).tolist(), release / IMAGE_DIRS["train"],
                              workdir / f"cache{cache_size}", cache_size, channels=1,
                              workers=cores(), progress=False)
    manifests = workdir / "manifests"
    manifests.mkdir(parents=True, exist_ok=True)
    train = pd.concat([frames["train"]] * math.ceil(rows / num_images), ignore_index=True)
    train.to_csv(manifests / MANIFESTS["train"], index=False)
    frames["val"].to_csv(manifests / MANIFESTS["val"], index=False)
    log.info("%d generated images cached at %d px, listed in %d training rows, in %.1f s", num_images,
             cache_size, len(train), time.perf_counter() - start)
    return release, cache, manifests


def config_batch_size(config: Path) -> int:
    """``data.batch_size`` of a Stage 1 config file."""
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    if not isinstance(data.get("batch_size"), int):
        raise ValueError(f"{config}: no data.batch_size; give --batch-size")
    return data["batch_size"]


def fit_args(args: argparse.Namespace, release: Path, cache: Path, manifests: Path, run_dir: Path, out: Path,
             extra: list[str]) -> list[str]:
    """The ``Stage1_MAE.py`` command line: the config, the data, ``warmup + steps`` steps, no validation,
    no step checkpoints, the throughput callback, then ``extra``."""
    cli = ["fit", "--config", str(args.config), "--data.root", str(release),
           "--data.manifest_dir", str(manifests), "--data.train_cache", str(cache),
           "--seed_everything", str(args.seed), "--trainer.default_root_dir", str(run_dir),
           "--trainer.accelerator", args.device, "--trainer.devices", "1", "--trainer.num_nodes", "1",
           "--trainer.max_steps", str(args.warmup + args.steps), "--trainer.max_epochs", "-1",
           "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--checkpoint_every_n_steps", "0", "--wandb", "disabled",
           "--trainer.callbacks+=pacx.perf.fit.StepThroughput",
           "--trainer.callbacks.warmup_steps", str(args.warmup), "--trainer.callbacks.json_path", str(out),
           "--trainer.callbacks.peak_tflops", str(args.peak_tflops)]
    optional = {"--trainer.precision": args.precision, "--data.batch_size": args.batch_size,
                "--data.num_workers": args.workers, "--model.arch": args.arch,
                "--data.img_size": args.img_size,
                "--model.compile": None if args.compile is None else str(args.compile).lower()}
    for key, value in optional.items():
        if value is not None:
            cli += [key, str(value)]
    return cli + extra


def run(args: argparse.Namespace, extra: list[str], workdir: Path) -> dict:
    from Stage1_MAE import main as stage1_main

    batch = args.batch_size or config_batch_size(args.config)  # global = per device here (one device)
    release, cache, manifests = prepare_data(workdir, args.num_images, args.cache_size, args.seed,
                                             (args.warmup + args.steps + 1) * batch)
    out = workdir / "throughput.json"
    out.unlink(missing_ok=True)
    cli = fit_args(args, release, cache, manifests, workdir / "run", out, extra)
    log.info("Stage1_MAE.py %s", " ".join(cli))
    start = time.perf_counter()
    stage1 = stage1_main(cli)
    wall = time.perf_counter() - start
    result = read_throughput(out)
    hp, dm = stage1.model.hparams, stage1.datamodule.hparams
    result.update({
        "what": "Stage1_MAE.py fit: uint8 cache loader, MAEModule, AdamW, logging",
        "config": str(args.config), "arch": hp.arch, "img_size": hp.img_size, "mask_ratio": hp.mask_ratio,
        "compile": bool(hp.get("compile")), "compile_options": hp.get("compile_options"),
        "fused_adamw": bool(stage1.trainer.optimizers[0].defaults.get("fused")),
        "batch": stage1.datamodule.per_device_batch, "global_batch": dm.batch_size,
        "num_workers": dm.num_workers,
        "num_images": args.num_images, "cache_size": args.cache_size, "fit_wall_s": wall,
        "torch": torch.__version__, "git": git_sha(),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cli_extra": extra,
    })
    return result


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, extra = parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, extra, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="benchmark_fit_") as tmp:
            result = run(args, extra, Path(tmp))
    mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
    memory = "n/a" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.1f} GiB"
    print(f"Stage 1 fit on {result['device_name']}: {result['img_per_s_per_device']:.1f} img/s per device "
          f"(batch {result['batch']}, {result['timed_steps']} steps after {result['warmup_steps']}), "
          f"MFU {mfu}, peak memory {memory}")
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.rates is not None:
        keep = ("device", "device_name", "precision", "batch", "compile", "fused_adamw", "arch", "img_size",
                "mask_ratio", "mfu", "peak_tflops", "timed_steps", "torch", "git", "measured", "what")
        entry = {"img_per_s": result["img_per_s_per_device"], **{k: result[k] for k in keep}}
        merge_rates(args.rates, {"stage1": entry})
        print(f"merged stage1 into {args.rates}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

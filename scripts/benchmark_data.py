"""Benchmark the Stage 1 train image path: per-file PIL decode + augment vs the decoded cache.

Writes CheXpert-like JPEGs (``write_chexpert_release``, 390x320), builds a cache at ``--cache-size``,
then times two pipelines that hand the training step the same batches, float32 [B, 3, img, img]
ImageNet-normalised plus labels [B, 14]:

  pil    ImageManifestDataset + mae_train(img) per sample + default collate (the per-file path)
  cache  CachedImageDataset (uint8 rows) + BatchedCropFlip(img) collate (uint8 crops in the workers),
         then ``normalize_batch`` on each batch in the consuming process, exactly as the data module's
         ``on_after_batch_transfer`` does (there on the accelerator; here, on the CPU, counted in full)

Both use the same workers, batch size and shuffling; ``ratio`` is cache / pil. Reference rows:
``cache_worker_float`` normalises inside the workers instead (float32 batches through shared memory);
``cache_uint8_to_device`` is the loader alone, i.e. what a GPU run's host side must sustain when the
normalisation runs on the GPU (``ratio_uint8_to_device``; its batches are uint8 [B, 1, H, W]).

Each timed run iterates ``--passes`` shuffled epochs; one warm-up run per path (it also starts the
persistent workers) is not timed; the timed runs alternate between paths and the median is reported.
Usage: ``python scripts/benchmark_data.py [--num-images 512] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, RandomSampler

from pacx.data.batched import BatchedCropFlip, normalize_batch
from pacx.data.cache import CachedImageDataset, ImageCache, build_image_cache
from pacx.data.manifest import ImageManifestDataset
from pacx.data.transforms import mae_train
from pacx.testing.chexpert import RELEASE_LABELS, write_chexpert_release
from pacx.utils import write_text_atomic

log = logging.getLogger("benchmark_data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cache-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per path; the median is reported")
    p.add_argument("--passes", type=int, default=2, help="shuffled epochs per timed run")
    p.add_argument("--workdir", type=Path, default=None, help="keep images and cache here (default: temp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results as a flat JSON object")
    return p.parse_args(argv)


def _loader(dataset, args, collate_fn=None) -> DataLoader:
    # One shuffled iterator over `passes` epochs: fewer restarts, so less pipeline fill and drain per timing.
    sampler = RandomSampler(dataset, num_samples=len(dataset) * args.passes)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      persistent_workers=args.num_workers > 0, collate_fn=collate_fn)


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


def _timed_pass(loader: DataLoader, finish=_identity) -> float:
    """Images per second over one run of the loader, ``finish`` applied to every batch."""
    n = 0
    start = time.perf_counter()
    for images, _ in loader:
        n += len(finish(images))
    return n / (time.perf_counter() - start)


def run(args: argparse.Namespace, workdir: Path) -> dict:
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    write_chexpert_release(workdir, n_train=args.num_images, n_valid=0, seed=args.seed)
    log.info("wrote %d JPEGs in %.1f s", args.num_images, time.perf_counter() - start)
    df = pd.read_csv(workdir / "train.csv")
    start = time.perf_counter()
    cache_dir = build_image_cache(df["Path"], workdir, workdir / f"cache{args.cache_size}", args.cache_size,
                                  channels=1, workers=args.num_workers, strip_components=1,
                                  progress=False)
    build_s = time.perf_counter() - start

    # Release paths start with the release folder; the image root is its parent's contents.
    df["rel"] = df["Path"].str.split("/", n=1).str[1]
    # The release leaves most label cells blank; this benchmark only times loading, so blanks count as 0.
    pil_ds = ImageManifestDataset(df, workdir, "rel", RELEASE_LABELS, transform=mae_train(args.img_size),
                                  label_fill=0)
    cache_ds = CachedImageDataset(ImageCache(cache_dir), df["Path"].tolist(), pil_ds.labels)
    pipelines = {  # name -> (loader, what the consuming process does to each batch)
        "pil": (_loader(pil_ds, args), _identity),
        "cache": (_loader(cache_ds, args, BatchedCropFlip(args.img_size)), normalize_batch),
        "cache_worker_float": (_loader(cache_ds, args, BatchedCropFlip(args.img_size, normalize=True)),
                               _identity),
        "cache_uint8_to_device": (_loader(cache_ds, args, BatchedCropFlip(args.img_size)), _identity),
    }
    shapes = {}
    for name, (loader, finish) in pipelines.items():  # warm-up: starts workers, fills the page cache
        images, labels = next(iter(loader))
        images = finish(images)
        shapes[name] = (tuple(images.shape), images.dtype, tuple(labels.shape), labels.dtype)
        _timed_pass(loader, finish)
    float_shapes = {k: v for k, v in shapes.items() if k != "cache_uint8_to_device"}
    if len(set(float_shapes.values())) != 1:
        raise RuntimeError(f"the pipelines yield different batches: {float_shapes}")
    rates = {name: [] for name in pipelines}
    for _ in range(args.repeats):
        for name, (loader, finish) in pipelines.items():
            rates[name].append(_timed_pass(loader, finish))
    med = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "pil_images_per_s": med["pil"],
        "cache_images_per_s": med["cache"],
        "ratio": med["cache"] / med["pil"],
        "cache_worker_float_images_per_s": med["cache_worker_float"],
        "ratio_worker_float": med["cache_worker_float"] / med["pil"],
        "cache_uint8_to_device_images_per_s": med["cache_uint8_to_device"],
        "ratio_uint8_to_device": med["cache_uint8_to_device"] / med["pil"],
        "num_workers": args.num_workers,
        "batch_size": args.batch_size,
        "num_images": args.num_images,
        "img_size": args.img_size,
        "cache_size": args.cache_size,
        "repeats": args.repeats,
        "passes": args.passes,
        "cache_build_s": build_s,
        "torch_threads_main": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="pacx_bench_data_") as tmp:
            result = run(args, Path(tmp))
    lines = [f"{args.num_images} images, batch {args.batch_size}, {args.num_workers} workers, "
             f"{args.img_size} px out, cache {args.cache_size} px (built in {result['cache_build_s']:.1f} "
             "s); rows yield float32 [B,3,H,W] except the last (uint8 [B,1,H,W], normalised later on the "
             "GPU)",
             f"{'path':<58} {'images/s':>9} {'x pil':>6}"]
    rows = [
        ("pil: ImageManifestDataset + mae_train", "pil_images_per_s"),
        ("cache: uint8 BatchedCropFlip + normalize_batch on arrival", "cache_images_per_s"),
        ("cache_worker_float: normalised in the workers (reference)", "cache_worker_float_images_per_s"),
        ("cache_uint8_to_device: the loader alone (reference)", "cache_uint8_to_device_images_per_s"),
    ]
    for label, key in rows:
        lines.append(f"{label:<58} {result[key]:>9.0f} {result[key] / result['pil_images_per_s']:>6.1f}")
    lines.append(f"ratio cache / pil: {result['ratio']:.1f}x")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

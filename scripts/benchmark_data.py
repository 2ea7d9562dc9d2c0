"""Benchmark the Stage 1 train image path: per-file PIL decode + augment vs the decoded cache.

Writes CheXpert-like JPEGs (``write_chexpert_release``, 390x320), builds a cache at ``--cache-size``,
then times two DataLoaders that yield the same batches, float32 [B, 3, img, img] plus labels [B, 14]:

  pil    ImageManifestDataset + mae_train(img) per sample + default collate
  cache  CachedImageDataset (uint8 rows) + BatchedCropFlip(img) collate (one grid_sample per batch)

Both use the same workers, batch size and shuffling; ``ratio`` is cache / pil. Two reference rows:

  cache_uint8  the same collate with ``normalize=False``: uint8 [B, 1, img, img] batches, to be normalised
               on the accelerator (``normalize_batch``); not the same output, so not in ``ratio``
  handoff      a collate that only fills a float32 [B, 3, img, img] batch in shared memory: the ceiling
               of any DataLoader that yields that batch on this machine

One warm-up pass per path (it also starts the persistent workers) is not timed; the timed passes
alternate between paths and the median is reported.
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

if __package__ in (None, ""):  # run as a file from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pacx.data.cache import (  # noqa: E402
    BatchedCropFlip,
    CachedImageDataset,
    ImageCache,
    _batch_buffer,
    build_image_cache,
)
from pacx.data.manifest import ImageManifestDataset  # noqa: E402
from pacx.data.synthetic.chexpert import RELEASE_LABELS, write_chexpert_release  # noqa: E402
from pacx.data.transforms import mae_train  # noqa: E402

log = logging.getLogger("benchmark_data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cache-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5, help="timed passes per path; the median is reported")
    p.add_argument("--workdir", type=Path, default=None, help="keep images and cache here (default: temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results as a flat JSON object")
    return p.parse_args(argv)


def _loader(dataset, args, collate_fn=None) -> DataLoader:
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                      persistent_workers=args.num_workers > 0, collate_fn=collate_fn)


class _HandoffOnly:
    """Collate that only fills the float output batch: what every path pays to hand a batch over."""

    def __init__(self, img_size: int) -> None:
        self.img_size = img_size

    def __call__(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        out = _batch_buffer((len(samples), 3, self.img_size, self.img_size)).fill_(0.5)
        return out, torch.stack([s[2] for s in samples])


def _timed_pass(loader: DataLoader) -> float:
    """Images per second over one full pass."""
    n = 0
    start = time.perf_counter()
    for images, _ in loader:
        n += len(images)
    return n / (time.perf_counter() - start)


def run(args: argparse.Namespace, workdir: Path) -> dict:
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    write_chexpert_release(workdir, n_train=args.num_images, n_valid=0, seed=args.seed)
    log.info("wrote %d JPEGs in %.1f s", args.num_images, time.perf_counter() - start)
    df = pd.read_csv(workdir / "train.csv")
    start = time.perf_counter()
    cache_dir = build_image_cache(df["Path"], workdir, workdir / f"cache{args.cache_size}", args.cache_size,
                                  channels=1, workers=max(args.num_workers, 1), strip_components=1,
                                  progress=False)
    build_s = time.perf_counter() - start

    # Release paths start with the release folder; the image root is its parent's contents.
    df["rel"] = df["Path"].str.split("/", n=1).str[1]
    pil_ds = ImageManifestDataset(df, workdir, "rel", RELEASE_LABELS, transform=mae_train(args.img_size))
    cache_ds = CachedImageDataset(ImageCache(cache_dir), df["Path"].tolist(), pil_ds.labels)
    loaders = {
        "pil": _loader(pil_ds, args),
        "cache": _loader(cache_ds, args, BatchedCropFlip(args.img_size)),
        "cache_uint8": _loader(cache_ds, args, BatchedCropFlip(args.img_size, normalize=False)),
        "handoff": _loader(cache_ds, args, _HandoffOnly(args.img_size)),
    }
    shapes = {}
    for name, loader in loaders.items():  # warm-up: starts workers, fills the page cache
        images, labels = next(iter(loader))
        shapes[name] = (tuple(images.shape), images.dtype, tuple(labels.shape), labels.dtype)
        _timed_pass(loader)
    if shapes["pil"] != shapes["cache"]:
        raise RuntimeError(f"pil and cache paths yield different batches: {shapes}")
    rates = {name: [] for name in loaders}
    for _ in range(args.repeats):
        for name, loader in loaders.items():
            rates[name].append(_timed_pass(loader))
    med = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "pil_images_per_s": med["pil"],
        "cache_images_per_s": med["cache"],
        "ratio": med["cache"] / med["pil"],
        "cache_uint8_images_per_s": med["cache_uint8"],
        "ratio_uint8": med["cache_uint8"] / med["pil"],
        "handoff_images_per_s": med["handoff"],
        "ratio_ceiling": med["handoff"] / med["pil"],
        "num_workers": args.num_workers,
        "batch_size": args.batch_size,
        "num_images": args.num_images,
        "img_size": args.img_size,
        "cache_size": args.cache_size,
        "repeats": args.repeats,
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
    print(f"{args.num_images} images, batch {args.batch_size}, {args.num_workers} workers, "
          f"{args.img_size} px out, cache {args.cache_size} px (built in {result['cache_build_s']:.1f} s)")
    rows = [
        ("pil: ImageManifestDataset + mae_train", "pil_images_per_s", "float32 [B,3,H,W]"),
        ("cache: CachedImageDataset + BatchedCropFlip", "cache_images_per_s", "float32 [B,3,H,W]"),
        ("cache_uint8: normalize=False (reference)", "cache_uint8_images_per_s", "uint8 [B,1,H,W]"),
        ("handoff: fill output only (ceiling)", "handoff_images_per_s", "float32 [B,3,H,W]"),
    ]
    print(f"{'path':<46} {'images/s':>9} {'x pil':>6}  batch")
    for label, key, out in rows:
        rate = result[key]
        print(f"{label:<46} {rate:>9.0f} {rate / result['pil_images_per_s']:>6.1f}  {out}")
    print(f"ratio cache / pil: {result['ratio']:.1f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

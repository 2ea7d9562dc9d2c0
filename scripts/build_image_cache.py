"""Decode a manifest's images once into a uint8 cache (``pacx.data.cache``) for the fast image path.

Example, the Stage 1 manifests of ``scripts/prepare.py chexpert`` (keys = the manifests' ``Path``, the
values the CheXpert data module looks up; train at 256 for random crops, val at the model's 224 so its
pixels equal the PIL path's)::

    python scripts/build_image_cache.py --manifest manifests/chexpert/chexpert_train_split.csv \\
        --image-root /data/chexpert/train --size 256 --out cache/chexpert/train
    python scripts/build_image_cache.py --manifest manifests/chexpert/chexpert_val_split.csv \\
        --image-root /data/chexpert/valid --size 224 --out cache/chexpert/val

A raw release CSV works too (``--strip-components 1`` drops its ``CheXpert-v1.0-small/`` prefix).

Rerunning the same command resumes an interrupted build; a finished cache is left as it is. The cache's
keys are the manifest's path values verbatim, so a DataModule looks rows up with the same CSV column.
Error messages give the manifest row (0-based, header excluded) of a blank path or a missing or unreadable
image.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from pacx.data.cache import ImageCache, build_image_cache
from pacx.data.manifest import read_manifest, require_paths
from pacx.progress import NO_PROGRESS_HELP, set_progress

log = logging.getLogger("build_image_cache")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True, help="CSV (or TSV) with a path column")
    p.add_argument("--image-root", type=Path, required=True, help="directory the (stripped) paths are under")
    p.add_argument("--path-column", default="Path")
    p.add_argument("--size", type=int, required=True, help="square side of the cached images, e.g. 256")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument("--out", type=Path, required=True, help="cache directory (created; reused to resume)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes, 0: this one")
    p.add_argument("--chunk", type=int, default=64, help="images per task; progress is saved per task")
    p.add_argument("--strip-components", type=int, default=0,
                   help="leading path components to drop before joining with --image-root")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.no_progress:
        set_progress(False)
    df = read_manifest(args.manifest, required_columns=[args.path_column])
    require_paths(df, args.path_column, str(args.manifest))
    start = time.perf_counter()
    out = build_image_cache(df[args.path_column].astype(str).tolist(), args.image_root, args.out, args.size,
                            channels=args.channels, workers=args.workers, chunk=args.chunk,
                            strip_components=args.strip_components)
    cache = ImageCache(out)
    size_mb = (out / "images.npy").stat().st_size / 2**20
    print(f"cache {out}: {cache.count} images, {cache.channels}x{cache.size}x{cache.size} uint8, "
          f"{size_mb:.1f} MiB, {time.perf_counter() - start:.1f} s this run")
    return out


if __name__ == "__main__":
    main()

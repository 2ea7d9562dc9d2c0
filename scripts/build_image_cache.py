"""Decode a manifest's images once into a uint8 cache (``pacx.data.cache``) for the fast image path.

Example, raw CheXpert-v1.0-small (its ``Path`` values start with the release folder)::

    python scripts/build_image_cache.py --manifest $CHEXPERT/train.csv --image-root $CHEXPERT \\
        --path-column Path --strip-components 1 --size 256 --channels 1 --out $CACHE/chexpert_train_256

Rerunning the same command resumes an interrupted build; a finished cache is left as it is. The cache's
keys are the manifest's path values verbatim, so a DataModule looks rows up with the same CSV column.
Error messages give the manifest row (0-based, header excluded) of a missing or unreadable image.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pacx.data.cache import ImageCache, build_image_cache  # noqa: E402
from pacx.data.manifest import read_manifest  # noqa: E402

log = logging.getLogger("build_image_cache")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True, help="CSV (or TSV) with a path column")
    p.add_argument("--image-root", type=Path, required=True, help="directory the (stripped) paths are under")
    p.add_argument("--path-column", default="Path")
    p.add_argument("--size", type=int, required=True, help="square side of the cached images, e.g. 256")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument("--out", type=Path, required=True, help="cache directory (created; reused to resume)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes; 0 = in-process")
    p.add_argument("--chunk", type=int, default=64, help="images per task; progress is saved per task")
    p.add_argument("--strip-components", type=int, default=0,
                   help="leading path components to drop before joining with --image-root")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    df = read_manifest(args.manifest, required_columns=[args.path_column])
    start = time.perf_counter()
    out = build_image_cache(df[args.path_column].astype(str).tolist(), args.image_root, args.out, args.size,
                            channels=args.channels, workers=args.workers, chunk=args.chunk,
                            strip_components=args.strip_components, progress=not args.no_progress)
    cache = ImageCache(out)
    size_mb = (out / "images.npy").stat().st_size / 2**20
    print(f"cache {out}: {cache.count} images, {cache.channels}x{cache.size}x{cache.size} uint8, "
          f"{size_mb:.1f} MiB, {time.perf_counter() - start:.1f} s this run")
    return out


if __name__ == "__main__":
    main()

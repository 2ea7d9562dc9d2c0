"""``python -m pacx.demo.phantom --out DIR [--quick] [--seed N] [--img-size S] [--grid PNG] [--no-progress]``.

Writes every phantom release (``generate_phantom``) and prints ``name<TAB>path`` per written path; with
``--grid`` only the picture grid is rendered.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pacx.demo.phantom.generate import PRESETS, generate_phantom
from pacx.demo.phantom.grid import save_grid
from pacx.progress import NO_PROGRESS_HELP, set_progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate the physiology phantom in the real release layouts.")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--quick", action="store_true", help="the tiny preset (tests, smoke runs)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="size preset (default full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--img-size", type=int, default=None,
                        help="CXR size in pixels (default: the preset's)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing release folders")
    parser.add_argument("--workers", type=int, default=2, help="processes writing releases (default 2)")
    parser.add_argument("--grid", default=None, help="only render the picture grid to this PNG")
    parser.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    args = parser.parse_args(argv)
    if args.no_progress:
        set_progress(False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.grid:
        save_grid(args.grid, seed=args.seed, size=args.img_size or 96)
        sys.stdout.write(f"grid\t{args.grid}\n")
        return 0
    if not args.out:
        parser.error("--out is required (unless --grid)")
    preset = args.preset or ("quick" if args.quick else "full")
    paths = generate_phantom(args.out, seed=args.seed, sizes=preset, img_size=args.img_size,
                             overwrite=args.overwrite, workers=args.workers)
    sys.stdout.write("".join(f"{name}\t{path}\n" for name, path in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

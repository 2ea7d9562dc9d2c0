#!/usr/bin/env python
"""The raw-pixel ceiling of a classification benchmark (:mod:`pacx.eval.ceiling`): what a logistic regression
on the pixels reaches, to place every encoder's probe between chance and it.

    python scripts/pixel_ceiling.py --benchmark chexchonet --root demo_runs/data/chexchonet \\
        --manifest-dir demo_runs/manifests/chexchonet --img-size 64 --json ceiling.json

Prints one line; ``--json`` writes
``{"benchmark", "auroc", "pca", "seed", "C", "n_train", "n_test", "img_size"}``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pacx.data.stage3 import BenchmarkDataModule
from pacx.eval.ceiling import pixel_ceiling
from pacx.utils import write_json_atomic

log = logging.getLogger("pixel_ceiling")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", required=True, help="registry name of a classification benchmark")
    parser.add_argument("--root", required=True, help="the image root (the release folder)")
    parser.add_argument("--manifest-dir", required=True, help="the converter's split CSVs")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--pca", type=int, default=50, help="PCA components before the regression")
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the regression")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomised PCA")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    dm = BenchmarkDataModule(args.benchmark, root=args.root, manifest_dir=args.manifest_dir,
                             img_size=args.img_size, num_workers=0, pin_memory=False)
    result = pixel_ceiling(dm, pca=args.pca, seed=args.seed, C=args.C)
    sys.stdout.write(f"{result['benchmark']}: raw-pixel logistic regression AUROC {result['auroc']:.4f} "
                     f"(PCA {result['pca']}, seed {result['seed']}, {result['n_train']} train / "
                     f"{result['n_test']} test images at {result['img_size']} px)\n")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())

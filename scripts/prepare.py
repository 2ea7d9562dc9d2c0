#!/usr/bin/env python
"""Turn an official dataset release into pacx manifests (never opens images).

    python scripts/prepare.py --list
    python scripts/prepare.py chexpert --raw /data/CheXpert-v1.0-small --out manifests/chexpert [--frontal-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pacx.data.prepare import load_builtin_converters, run_converter

log = logging.getLogger("prepare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the datasets with task type and metric")
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET")
    for conv in load_builtin_converters().values():
        p = sub.add_parser(conv.name, help=conv.description)
        p.add_argument("--raw", required=True, help="the release as downloaded")
        p.add_argument("--out", required=True, help="output directory for the manifests")
        for opt in conv.options:
            if opt.is_flag:
                p.add_argument(opt.flag, action="store_true", help=opt.help)
            else:
                p.add_argument(opt.flag, default=opt.default, help=opt.help)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    converters = load_builtin_converters()
    if args.list:
        width = max(len(n) for n in converters)
        sys.stdout.write(f"{'dataset':<{width}}  {'task':<13} {'metric':<10} description\n")
        for c in converters.values():
            sys.stdout.write(f"{c.name:<{width}}  {c.task:<13} {c.metric:<10} {c.description}\n")
        return 0
    if not args.dataset:
        parser.error("name a dataset (or --list)")
    options = {k: v for k, v in vars(args).items() if k not in {"list", "dataset", "raw", "out"}}
    summary = run_converter(args.dataset, args.raw, args.out, **options)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

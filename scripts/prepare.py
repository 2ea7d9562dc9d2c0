#!/usr/bin/env python
"""Turn an official dataset release into pacx manifests (never opens images), and check them for overlap with
Stage 2's Symile-MIMIC data.

    python scripts/prepare.py --list
    python scripts/prepare.py chexpert --raw /data/CheXpert-v1.0-small --out manifests/chexpert \
        [--frontal-only]
    python scripts/prepare.py medmod_phys --raw /data/MedMod --out manifests/medmod_phys \
        --exclude-hadm /data/symile-mimic/data_npy/train/hadm_id_train.npy
    python scripts/prepare.py check-overlap --symile /data/symile-mimic --manifests manifests \
        [--json overlap.json]

``check-overlap`` prints, per converted benchmark with MIMIC ids (MedMod; any manifest with ``subject_id`` /
``hadm_id`` columns or MIMIC-CXR-JPG paths), how many test rows share an admission or a patient with Symile's
train and val splits (patients need the release's ``train.csv`` / ``val.csv`` beside ``data_npy``). It exits
with 1 when a test row shares an admission with Symile's train split (docs/datasets.md#leakage). Every
subcommand takes ``--no-progress`` (no progress bars; they are off anyway when stderr is not a terminal).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pacx.data.converters.medmod import OverlapPolicyError
from pacx.data.leakage import LeakageError
from pacx.data.prepare import CONVERTERS, run_converter
from pacx.progress import NO_PROGRESS_HELP, set_progress

log = logging.getLogger("prepare")
CHECK_OVERLAP = "check-overlap"
COUNTS = ("admissions_train", "admissions_val", "patients_train", "patients_val")


def check_overlap(symile: str, manifests: str, json_out: str | None) -> int:
    """Print the overlap report; 1 when any test row is a Symile training admission."""
    from pacx.data.leakage import overlap_report
    from pacx.utils import write_json_atomic

    report = overlap_report(symile, manifests)
    sys.stdout.write(f"{'benchmark':<16} {'test rows':>9}  " + "  ".join(f"{c:>16}" for c in COUNTS) + "\n")
    for entry in report:
        cells = ["n/a" if entry.get(c) is None else str(entry[c]) for c in COUNTS] if entry["ids"] else \
            ["no MIMIC ids"] + [""] * (len(COUNTS) - 1)
        sys.stdout.write(f"{entry['benchmark']:<16} {entry['rows']:>9}  "
                         + "  ".join(f"{c:>16}" for c in cells) + "\n")
    if json_out:
        write_json_atomic(json_out, report)
    leaked = [e["benchmark"] for e in report if e.get("admissions_train")]
    if leaked:
        log.error("test rows share admissions with Symile's training split in: %s (rebuild them with "
                  "--exclude-hadm)", ", ".join(leaked))
    return 1 if leaked else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the datasets with task type and metric")
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET")
    check = sub.add_parser(CHECK_OVERLAP,
                           help="count test rows sharing admissions / patients with Symile-MIMIC")
    check.add_argument("--symile", required=True, help="the Symile-MIMIC release folder, or its data_npy/")
    check.add_argument("--manifests", required=True,
                       help="folder holding one converted benchmark per subfolder")
    check.add_argument("--json", default=None, help="also write the report here")
    for conv in CONVERTERS.values():
        p = sub.add_parser(conv.name, help=conv.description)
        p.add_argument("--raw", required=True, help="the release as downloaded")
        p.add_argument("--out", required=True, help="output directory for the manifests")
        for opt in conv.options:
            if opt.is_flag:
                p.add_argument(opt.flag, action="store_true", help=opt.help)
            else:
                p.add_argument(opt.flag, default=opt.default, help=opt.help)
    for p in sub.choices.values():
        p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    converters = CONVERTERS
    if args.list:
        width = max(len(n) for n in converters)
        sys.stdout.write(f"{'dataset':<{width}}  {'task':<13} {'metric':<10} description\n")
        for c in converters.values():
            sys.stdout.write(f"{c.name:<{width}}  {c.task:<13} {c.metric:<10} {c.description}\n")
        return 0
    if getattr(args, "no_progress", False):
        set_progress(False)
    if not args.dataset:
        parser.error("name a dataset (or --list)")
    if args.dataset == CHECK_OVERLAP:
        return check_overlap(args.symile, args.manifests, args.json)
    options = {k: v for k, v in vars(args).items()
               if k not in {"list", "dataset", "raw", "out", "no_progress"}}
    try:
        summary = run_converter(args.dataset, args.raw, args.out, **options)
    except (OverlapPolicyError, LeakageError) as err:
        log.error("%s", err)
        return 2
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

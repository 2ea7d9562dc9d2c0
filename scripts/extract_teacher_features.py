#!/usr/bin/env python
"""Write the Stage 2 teacher features (<teacher>_features.npy) into a Symile-MIMIC tree.

    python scripts/extract_teacher_features.py --data-root /data/symile/data_npy \\
        --ecgfounder /weights/12_lead_ECGFounder.pth --labs-dae runs/teachers/labs_dae/checkpoints/last.ckpt
    python scripts/extract_teacher_features.py --data-root /data/symile/data_npy --teacher NAME=WEIGHTS

For each split (default: train, val, test, and test_uni when that folder exists) it writes
``<root>/<split>/ecg_features.npy`` float32 [N, 1024] and ``labs_features.npy`` float32 [N, 256]
(docs/datasets.md#teacher-features), or the feature file of any teacher registered in
``pacx.teachers.TEACHERS`` given with ``--teacher NAME=WEIGHTS`` (``--ecgfounder`` is ``--teacher ecg=``,
``--labs-dae`` is ``--teacher labs=``). Any subset of the teachers may be given. Outputs that already exist
with the right shape are skipped unless ``--overwrite``; an interrupted run never leaves a partial file at the
final name. ``test_uni`` features are the first rows of test's (its positives). All the work is in
``pacx.teachers``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pacx.models.ecgfounder import ECGFOUNDER_CONFIGS
from pacx.progress import NO_PROGRESS_HELP, set_progress
from pacx.teachers import DEFAULT_BATCH_SIZE, FEATURE_SPLITS, extract_teacher_features, load_teachers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="the data_npy directory (holding train/, val/, test/)")
    p.add_argument("--ecgfounder", help="ECGFounder weights (.pth with 'state_dict', or .safetensors)")
    p.add_argument("--labs-dae", help="labs DAE: pacx run dir, Lightning checkpoint or safetensors export")
    p.add_argument("--teacher", action="append", default=[], metavar="NAME=WEIGHTS",
                   help="a registered teacher and its weights file; repeatable")
    p.add_argument("--splits", nargs="+", choices=FEATURE_SPLITS, default=None,
                   help="splits to process (default: train val test, plus test_uni if it exists)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    p.add_argument("--ecgfounder-config", default="12_lead", choices=sorted(ECGFOUNDER_CONFIGS))
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a full unpickle of the ECGFounder file if weights_only=True refuses it")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    args = p.parse_args(argv)
    args.weights = {}
    for name, path in (("ecg", args.ecgfounder), ("labs", args.labs_dae),
                       *(t.partition("=")[::2] for t in args.teacher)):
        if path is None:
            continue
        if not name or not path or name in args.weights:
            p.error(f"teacher {name!r}: give each teacher once, as NAME=WEIGHTS (--ecgfounder is ecg, "
                    "--labs-dae labs)")
        args.weights[name] = path
    if not args.weights:
        p.error("give --ecgfounder, --labs-dae and/or --teacher NAME=WEIGHTS")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.no_progress:
        set_progress(False)
    options = {"ecg": {"config": args.ecgfounder_config, "trust_pickle": args.trust_pickle}}
    teachers = load_teachers(args.weights,
                             {k: v for k, v in options.items() if k in args.weights}, args.device)
    results = extract_teacher_features(args.data_root, teachers, args.splits, args.batch_size, args.overwrite)
    lines = [f"{'split':<10} {'file':<18} {'shape':<14} {'status':<8} {'seconds':>8}"]
    for r in results:
        lines.append(f"{r.split:<10} {r.path.name:<18} {str(list(r.shape)):<14} {r.status:<8} "
                     f"{r.seconds:>8.1f}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

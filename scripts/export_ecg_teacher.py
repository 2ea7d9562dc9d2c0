#!/usr/bin/env python
"""Write the ECG teacher of an ECG SSL run (``configs/demo/ecg_teacher.yaml``) as ECGFounder safetensors.

    python scripts/export_ecg_teacher.py demo_runs/ecg_teacher ecg_teacher.safetensors
    python scripts/extract_teacher_features.py --data-root <data_npy> \\
        --ecgfounder ecg_teacher.safetensors --ecgfounder-config demo_small

Only the backbone is written (projection head dropped), with ECGFounder's own key names, checked
strictly against the run's ECGFounder config first; ``load_ecgfounder(out, config=...)`` reads it. The
source must be an ``ecg_ssl`` run directory (its ``run.json`` names the checkpoint) or checkpoint;
anything else is refused with an error naming the file. All the work is in ``pacx.models.ecg_ssl``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pacx.models.ecg_ssl import export_ecg_teacher


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="ECG SSL run directory or its Lightning checkpoint")
    parser.add_argument("out", help="output .safetensors path")
    parser.add_argument("--which", default="last", choices=["last", "best"],
                        help="for a run directory: which checkpoint (default last)")
    args = parser.parse_args(argv)
    out = export_ecg_teacher(args.source, args.out, which=args.which)
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

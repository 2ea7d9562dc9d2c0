#!/usr/bin/env python
"""Convert an ECGFounder checkpoint (official ``.pth`` pickle) to safetensors, once.

    python scripts/convert_ecgfounder.py 12_lead_ECGFounder.pth 12_lead_ECGFounder.safetensors
    python scripts/convert_ecgfounder.py 12_lead_ECGFounder.pth out.safetensors --trust-pickle

Only the tensors under ``'state_dict'`` are kept (head included; optimizer, scheduler and other
entries dropped; a ``module.`` prefix removed). They are checked strictly against ``--config`` before
anything is written. ``load_ecgfounder`` then reads the ``.safetensors`` file without any pickle.
``--trust-pickle`` unpickles in full when ``weights_only=True`` refuses the file: use it only for a file
from the official source.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pacx.models.ecgfounder import ECGFOUNDER_CONFIGS, convert_ecgfounder


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="ECGFounder checkpoint (.pth with 'state_dict', or .safetensors)")
    parser.add_argument("out", help="output .safetensors path")
    parser.add_argument("--config", default="12_lead", choices=sorted(ECGFOUNDER_CONFIGS),
                        help="architecture the tensors must fit (default 12_lead)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow a full unpickle if weights_only=True refuses the file "
                             "(trusted files only)")
    args = parser.parse_args(argv)
    out = convert_ecgfounder(args.source, args.out, config=args.config, trust_pickle=args.trust_pickle)
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Write the encoder of a run, checkpoint or weights file as safetensors (encoder keys only).

    python scripts/export_encoder.py runs/stage1/mae_vitb_chexpert encoder.safetensors

The file's metadata holds ``timm_model`` and ``timm_kwargs`` so that
``timm.create_model(meta["timm_model"], num_classes=0, **json.loads(meta["timm_kwargs"]))`` loads it
with ``strict=True``, plus ``stage``, ``source`` (the checkpoint's path inside its run, never an absolute
path), ``source_sha256`` and ``git_sha``. A debug run is refused unless ``--allow-debug`` (the export then
carries the run's ``debug`` flags).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pacx.encoders import export_encoder


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run directory, Lightning checkpoint, MAE release / timm / safetensors file")
    parser.add_argument("out", help="output .safetensors path")
    parser.add_argument("--which", default="last", choices=["last", "best"],
                        help="for a run directory: which checkpoint (default last, as Stage 3 uses)")
    parser.add_argument("--allow-debug", action="store_true",
                        help="export a debug run (fast_dev_run / overfit_batches / limit_*) too; marked in the metadata")
    args = parser.parse_args(argv)
    out = export_encoder(args.source, args.out, which=args.which, allow_debug=args.allow_debug or None)
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

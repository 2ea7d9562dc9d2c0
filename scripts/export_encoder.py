#!/usr/bin/env python
"""Write the encoder of a run, checkpoint or weights file as safetensors, a timm model folder or ONNX.

    python scripts/export_encoder.py runs/stage1/mae_vitb_chexpert encoder.safetensors          # one file
    python scripts/export_encoder.py runs/stage1/mae_vitb_chexpert pacx-mae-vitb16 --format timm  # a folder
    python scripts/export_encoder.py runs/stage1/mae_vitb_chexpert encoder.onnx --format onnx     # one file

OUT is a file for ``safetensors`` (the default) and ``onnx`` (its name must end in ``.onnx``), and a folder
for ``timm``: ``config.json`` + ``model.safetensors`` + a ``README.md`` model card, which
``timm.create_model("local-dir:OUT", pretrained=True)`` loads and ``huggingface_hub.upload_folder`` uploads.
The folder is written as one unit (a crash leaves the previous OUT or none); an existing OUT holding a
previous export is replaced, one holding any other file is refused.
``--pool`` picks the feature the timm model and the ONNX graph return (``cls``: the CLS token, the paper's
feature; ``avg``: the mean of the patch tokens); it is not part of the weights. ONNX export needs
``pip install 'pacx[serve]'``; details in :mod:`pacx.share`.

The safetensors metadata holds ``timm_model`` and ``timm_kwargs`` so that
``timm.create_model(meta["timm_model"], num_classes=0, **json.loads(meta["timm_kwargs"]))`` loads it
with ``strict=True``, plus ``stage``, ``source`` (the checkpoint's path inside its run, never an absolute
path), ``source_sha256`` and ``git_sha``. A debug run is refused unless ``--allow-debug`` (the export then
carries the run's ``debug`` flags).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pacx.share import EXPORT_FORMATS, TIMM_POOLS


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source",
                        help="run directory, Lightning checkpoint, MAE release / timm / safetensors file")
    parser.add_argument("out", help="output: a .safetensors file, a folder (--format timm) or a .onnx file")
    parser.add_argument("--format", default="safetensors", choices=list(EXPORT_FORMATS),
                        help="safetensors (default): one file; timm: a Hub-style model folder; "
                             "onnx: one .onnx file")
    parser.add_argument("--pool", default="cls", choices=sorted(TIMM_POOLS),
                        help="feature of the timm model / ONNX graph (default cls, the CLS token)")
    parser.add_argument("--which", default="last", choices=["last", "best"],
                        help="for a run directory: which checkpoint (default last, as Stage 3 uses)")
    parser.add_argument("--allow-debug", action="store_true",
                        help="export a debug run (fast_dev_run / overfit_batches / limit_*) too; marked in "
                             "the metadata")
    args = parser.parse_args(argv)
    out = EXPORT_FORMATS[args.format](args.source, args.out, which=args.which,
                                      allow_debug=args.allow_debug or None, pool=args.pool)
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

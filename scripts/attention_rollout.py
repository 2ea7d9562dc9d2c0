#!/usr/bin/env python
"""Attention rollout heatmaps of several encoders side by side (docs/method.md#stage-3).

    python scripts/attention_rollout.py --backbones mae=runs/stage1/mae pacx=encoder_pacx.safetensors \\
        --images manifests/chexpert/chexpert_val_split.csv --image-root data/chexpert/valid --out rollout.png

One row per image: the image, then one rollout overlay per backbone (Abnar & Zuidema 2020; see
``pacx.eval.rollout``). A backbone is ``name=PATH`` with anything ``pacx.load_encoder`` accepts, or
``name=random:<arch>`` for a randomly initialised encoder (e.g. ``random:vit_base_patch16``). The raw
heatmaps are saved beside the PNG as ``<out stem>.npz`` ({name: [N, g, g] float32}).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from pacx.eval.rollout import (
    HEAD_FUSIONS,
    collect_image_paths,
    load_gray,
    model_inputs,
    render_grid,
    resize_longest,
    rollout_heatmaps,
    save_heatmaps_npz,
)

log = logging.getLogger("attention_rollout")
RANDOM_PREFIX = "random:"


def parse_backbones(specs: list[str]) -> dict[str, str]:
    """``["mae=PATH", ...]`` -> {name: source}, in the given order; names must be unique."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"backbone {spec!r} is not of the form name=path (or name=random:<arch>)")
        if name in out:
            raise ValueError(f"backbone name {name!r} given twice")
        out[name] = source
    return out


def load_backbones(sources: dict[str, str], img_size: int | None,
                   seed: int = 0) -> tuple[dict[str, nn.Module], int]:
    """Load every encoder (eval mode) and check that all take the same image size.

    The size is ``img_size`` if given, else the first file encoder's own; random encoders are built
    at that size (224 if there are only random ones), after ``torch.manual_seed(seed)``, so that their weights
    do not depend on the file encoders loaded before them (loading one draws random numbers).
    """
    from pacx import load_encoder
    from pacx.models.backbones import BackboneConfig, build_backbone

    encoders: dict[str, nn.Module] = {}
    for name, source in sources.items():
        if not source.startswith(RANDOM_PREFIX):
            encoders[name] = load_encoder(source)
            own = encoders[name].cfg.img_size
            img_size = img_size or own
            if own != img_size:
                raise ValueError(f"backbone {name!r} ({source}) takes {own} px images, not {img_size} px; "
                                 "all backbones must share one image size")
            log.info("%s: %s (%d px)", name, source, own)
    img_size = img_size or 224
    torch.manual_seed(seed)
    for name, source in sources.items():
        if source.startswith(RANDOM_PREFIX):
            arch = source[len(RANDOM_PREFIX):]
            encoders[name] = build_backbone(BackboneConfig(kind="random", arch=arch,
                                                           img_size=img_size)).eval()
            log.info("%s: random %s (%d px)", name, arch, img_size)
    return {name: encoders[name] for name in sources}, img_size


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", required=True, metavar="NAME=PATH",
                        help="encoders to compare: name=path (run dir, checkpoint, export, ...) or "
                             "name=random:<arch>")
    parser.add_argument("--images", nargs="+", required=True,
                        help="image files, directories (.png/.jpg/.jpeg inside) or CSV manifests")
    parser.add_argument("--path-column", default="Path",
                        help="image-path column of CSV manifests (default Path)")
    parser.add_argument("--image-root", default=None,
                        help="root for relative CSV paths (default: the CSV's folder)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="model input size (default: the first encoder's own; all encoders must agree)")
    parser.add_argument("--head-fusion", default="mean", choices=sorted(HEAD_FUSIONS))
    parser.add_argument("--discard-ratio", type=float, default=0.0,
                        help="fraction of the weakest non-CLS attention entries zeroed per block (default 0)")
    parser.add_argument("--max-images", type=int, default=8, help="use at most this many images (default 8)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="heatmap opacity in the overlays (default 0.5)")
    parser.add_argument("--display-size", type=int, default=256, help="longest side of each panel in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed for random-init backbones (default 0)")
    parser.add_argument("--out", default="rollout.png", help="output PNG (default rollout.png)")
    args = parser.parse_args(argv)

    try:
        encoders, img_size = load_backbones(parse_backbones(args.backbones), args.img_size, args.seed)
        paths = collect_image_paths(args.images, args.path_column, args.image_root)[: args.max_images]
        if not paths:
            raise ValueError(f"no images found in {args.images}")
        images = [load_gray(p) for p in paths]
    except (ValueError, KeyError, FileNotFoundError) as err:
        parser.error(str(err))

    x = model_inputs(images, img_size)  # [N, 3, S, S]
    heatmaps = {}
    for name, encoder in encoders.items():
        # [N, g, g]
        heatmaps[name] = rollout_heatmaps(encoder, x, args.head_fusion, args.discard_ratio).numpy()
        log.info("%s: %d heatmaps of %dx%d", name, *heatmaps[name].shape)

    out = Path(args.out)
    render_grid([resize_longest(img, args.display_size) for img in images], heatmaps, out,
                alpha=args.alpha, row_labels=[p.name for p in paths])
    npz = save_heatmaps_npz(out.with_suffix(".npz"), heatmaps)
    log.info("heatmaps: %s", npz)
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

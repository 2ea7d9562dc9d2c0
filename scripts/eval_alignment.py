#!/usr/bin/env python
"""Alignment evaluation (docs/datasets.md#alignment): ridge probes from CXR features to the ECG and labs
teacher embeddings (or those of ``--teachers``, any registered in ``pacx.teachers.TEACHERS``), and with
``--zero-shot`` 1-of-10 retrieval through a Stage 2 run's projection heads.

    python scripts/eval_alignment.py --data-root /data/symile/data_npy \\
        --backbone mae=runs/stage1/mae_vitb_chexpert --backbone pacx=runs/stage2/pacx_vitb_symile \\
        --backbone random=random:vit_base_patch16 --json alignment.json

``--backbone`` is repeatable: ``name=path`` or a plain path (named by its stem), where the path is
anything ``pacx.load_encoder`` accepts; ``random:<arch>`` is a freshly initialised encoder (seeded by
``--seed``). Probes fit on ``train`` (the rows a shuffled drop-last loader of ``--drop-last-batch``
would yield) and score on ``test_uni``; zero-shot retrieval uses ``test``. A Markdown table goes to
stdout; ``--json`` writes ``{backbone: {"ecg": {...}, "labs": {...}, "zero_shot": {...}}}``.
``--cv-alpha`` also fits each probe with the penalty chosen by leave-one-out on the fit rows (a pacx
addition for small fit sets, where the paper's alpha 10 loses its R² to variance); its numbers go under
``"cv"`` in each target's entry, with the ``alpha`` chosen.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pacx.eval.alignment import FIT_BATCH, PAPER_ALPHA, RECALL_KS, load_split, probe_encoder
from pacx.eval.zero_shot import load_stage2_heads, stage2_pool, zero_shot_retrieval
from pacx.models.backbones import BackboneConfig, build_backbone
from pacx.models.vit import POOLS
from pacx.teachers import DEFAULT_TEACHERS, teacher_spec
from pacx.utils import write_json_atomic

log = logging.getLogger("eval_alignment")

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class BackboneSpec:
    """One ``--backbone``: a result name and its source (a path, or ``random:<arch>``)."""

    name: str
    source: str

    @property
    def random_arch(self) -> str | None:
        return self.source[len(RANDOM_PREFIX):] if self.source.startswith(RANDOM_PREFIX) else None

    def config(self, img_size: int, pool: str = "cls") -> BackboneConfig:
        """The ``pacx.models.backbones`` kind for this source: ``random`` or ``weights``."""
        if self.random_arch is not None:
            return BackboneConfig(kind="random", arch=self.random_arch, img_size=img_size, pool=pool)
        return BackboneConfig(kind="weights", weights=self.source, img_size=img_size, pool=pool)


def parse_backbone(text: str) -> BackboneSpec:
    """``name=source`` or a bare source; a bare path is named by its stem, ``random:<arch>`` by itself."""
    name, sep, source = text.partition("=")
    if not sep or not name or "/" in name:
        name, source = (text if text.startswith(RANDOM_PREFIX) else Path(text).stem), text
    if not source or source == RANDOM_PREFIX:
        raise argparse.ArgumentTypeError(f"--backbone {text!r}: expected name=path, a path or random:<arch>")
    return BackboneSpec(name, source)


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _targets(res: dict) -> list[str]:
    return [t for t in res if t != "zero_shot"]


def markdown_table(results: dict[str, dict], n_test: int) -> str:
    """Rows backbone × target, then one permutation-baseline row per target (its R@k = chance, 100·k/N)."""
    cols = ["backbone", "target", "R²", "cos", "cos (centred)", *(f"R@{k}" for k in RECALL_KS)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, res in results.items():
        for target in _targets(res):
            m = res[target]
            cells = [name, teacher_spec(target).title, _fmt(m["r2"], 4), _fmt(m["cos"], 4),
                     _fmt(m["cos_centred"], 4), *(_fmt(m[f"recall@{k}"], 2) for k in RECALL_KS)]
            lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(results.values()))
    targets = _targets(first)
    for target in targets:
        m = first[target]
        cells = ["baseline (permutation / chance)", teacher_spec(target).title, "–",
                 _fmt(m["baseline_cos"], 4), _fmt(m["baseline_cos_centred"], 4),
                 *(_fmt(100.0 * min(k, n_test) / n_test, 2) for k in RECALL_KS)]
        lines.append("| " + " | ".join(cells) + " |")
    dups = ", ".join(f"{teacher_spec(t).title} {first[t]['duplicate_rows']}" for t in targets)
    lines.append(f"\nfit rows: {first[targets[0]]['n_fit']}; test rows: {n_test}; duplicate target rows in "
                 f"test: {dups}")
    return "\n".join(lines) + "\n"


def zero_shot_table(results: dict[str, dict]) -> str:
    """One row per backbone, one column per teacher that any backbone's Stage 2 heads cover (in order of
    first appearance); "–" where a run has no head for it (a ``teachers: [labs]`` run beside a full one)."""
    teachers = list(dict.fromkeys(k.removeprefix("cxr_").removesuffix("_acc") for res in results.values()
                                  for k in res["zero_shot"] if k.endswith("_acc")))
    lines = ["| backbone | " + " | ".join(f"CXR→{teacher_spec(t).title}" for t in teachers)
             + " | chance | queries |",
             "|---|" + "---|" * len(teachers) + "---|---|"]
    for name, res in results.items():
        z = res["zero_shot"]
        accs = " | ".join(_fmt(z.get(f"cxr_{t}_acc"), 4) for t in teachers)
        lines.append(f"| {name} | {accs} | {z['chance']:.4f} | {z['n_queries']} |")
    return "\n".join(lines) + "\n"


def _finite(results: dict) -> bool:
    return all(_finite(v) if isinstance(v, dict) else math.isfinite(v) for v in results.values())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", type=parse_backbone, required=True,
                        help="name=path, a path, or name=random:<arch>; repeatable")
    parser.add_argument("--data-root", required=True, help="the Symile-MIMIC data_npy directory")
    parser.add_argument("--img-size", type=int, default=224, help="CXR side after the resize (default 224)")
    parser.add_argument("--batch-size", type=int, default=64, help="feature-extraction batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--alpha", type=float, default=PAPER_ALPHA,
                        help="ridge penalty (docs/datasets.md#alignment: 10)")
    parser.add_argument("--cv-alpha", action="store_true",
                        help="also fit each probe with its penalty chosen by leave-one-out on the fit rows "
                             "(JSON: 'cv' in each target's entry)")
    parser.add_argument("--drop-last-batch", type=int, default=FIT_BATCH,
                        help="fit on (N // B) * B random train rows as the reference's drop-last loader "
                        "(default 256: 9,984 of 10,000); 0 = all rows")
    parser.add_argument("--seed", type=int, default=0, help="fit-row draw and random-init seed")
    parser.add_argument("--teachers", nargs="+", default=list(DEFAULT_TEACHERS),
                        help="the teachers whose features are probed (default: "
                             f"{' '.join(DEFAULT_TEACHERS)})")
    parser.add_argument("--fit-split", default="train")
    parser.add_argument("--eval-split", default="test_uni")
    parser.add_argument("--zero-shot", action="store_true",
                        help="also 1-of-G retrieval on the test split with each backbone's Stage 2 heads "
                        "(every backbone must be a Stage 2 run directory or checkpoint)")
    parser.add_argument("--check-values", action="store_true", help="scan arrays for NaN/inf (slow on CXRs)")
    parser.add_argument("--pool", default="cls", choices=sorted(POOLS),
                        help="the CXR feature: CLS token or mean patch token (with --zero-shot: "
                             "each Stage 2 run's own)")
    parser.add_argument("--json", type=Path, help="write all numbers to this JSON file")
    args = parser.parse_args(argv)

    names = [b.name for b in args.backbone]
    if len(set(names)) != len(names):
        parser.error(f"backbone names must be unique, got {names}")
    heads, pools = {}, {b.name: args.pool for b in args.backbone}
    if args.zero_shot:  # fail before any feature extraction
        for spec in args.backbone:
            if spec.random_arch is not None:
                parser.error(f"--zero-shot needs Stage 2 runs or checkpoints; backbone {spec.name!r} is "
                             f"{spec.source}")
            heads[spec.name] = load_stage2_heads(spec.source)
            pools[spec.name] = stage2_pool(spec.source)  # the feature the run's heads were trained on
    fit = load_split(args.data_root, args.fit_split, args.check_values, args.teachers)
    test = load_split(args.data_root, args.eval_split, args.check_values, args.teachers)
    retrieval = (load_split(args.data_root, "test", args.check_values, args.teachers) if args.zero_shot
                 else None)

    results: dict[str, dict] = {}
    for spec in args.backbone:
        log.info("backbone %s (%s) on %s", spec.name, spec.source, args.device)
        torch.manual_seed(args.seed)
        encoder = build_backbone(spec.config(args.img_size, pools[spec.name])).eval()
        results[spec.name] = probe_encoder(encoder, fit, test, args.img_size, args.batch_size, args.device,
                                           args.alpha, args.drop_last_batch or None, args.seed,
                                           args.cv_alpha)
        if args.zero_shot:
            results[spec.name]["zero_shot"] = zero_shot_retrieval(encoder, heads[spec.name], retrieval,
                                                                  args.img_size, args.batch_size, args.device)
        del encoder
    if not _finite(results):
        log.warning("some alignment numbers are not finite: check the features")

    sys.stdout.write(markdown_table(results, len(test)))
    if args.zero_shot:
        sys.stdout.write("\n" + zero_shot_table(results))
    if args.json is not None:
        write_json_atomic(args.json, results)
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

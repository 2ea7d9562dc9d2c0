#!/usr/bin/env python
"""Benchmark serving an encoder on CPU: ONNX Runtime vs PyTorch latency per batch, in the same run.

The encoder is ``--weights`` (anything ``pacx.load_encoder`` reads) or a randomly initialised ``--arch`` from
pacx's registry (``pacx.models.vit.VIT_ARCHS``) at ``--img-size``; latency does not depend on the weights. It
is exported with :func:`pacx.share.encoder_to_onnx` (the path of ``scripts/export_encoder.py --format onnx``,
parity with PyTorch checked) to a temporary file. For each ``--batch-sizes`` entry, both run the same random
batch: ``--warmup`` untimed calls, then the median of ``--repeats`` timed calls, PyTorch under
``torch.inference_mode()`` and ONNX Runtime on ``CPUExecutionProvider``, both with ``--threads`` intra-op
threads (default: PyTorch's current count). Reported per batch size: milliseconds per call for each, the
PyTorch/ONNX Runtime ratio (> 1: ONNX Runtime is faster) and the largest feature difference.

    python scripts/benchmark_serve.py                                      # vit_demo at 64 px
    python scripts/benchmark_serve.py --arch vit_base_patch16 --img-size 224 --repeats 5 --json serve.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import pacx
from pacx.models.vit import VIT_ARCHS, create_vit
from pacx.share import ONNX_INPUT, encoder_to_onnx, require_serve

log = logging.getLogger("benchmark_serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_demo", choices=sorted(VIT_ARCHS),
                   help="random encoder of this size")
    p.add_argument("--img-size", type=int, default=64,
                   help="input size of the random encoder (default: the demo's)")
    p.add_argument("--weights", default=None,
                   help="benchmark this encoder instead (run dir, checkpoint, export)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per batch size and runtime (median)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for both (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    return p.parse_args(argv)


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run(args: argparse.Namespace) -> dict:
    _, ort = require_serve()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    encoder = (pacx.load_encoder(args.weights) if args.weights
               else create_vit(args.arch, img_size=args.img_size))
    encoder = encoder.eval()
    cfg = encoder.cfg
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = encoder_to_onnx(encoder, Path(tmp) / "encoder.onnx")
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        results = {"encoder": args.weights and Path(args.weights).name or args.arch, "img_size": cfg.img_size,
                   "embed_dim": cfg.embed_dim, "depth": cfg.depth, "patch_size": cfg.patch_size,
                   "threads": threads, "warmup": args.warmup, "repeats": args.repeats,
                   "onnx_export_s": round(export_s, 2),
                   "torch": torch.__version__, "onnxruntime": ort.__version__, "batches": {}}
        for batch in args.batch_sizes:
            x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size,
                            generator=torch.Generator().manual_seed(args.seed))
            feed = {ONNX_INPUT: x.numpy()}
            with torch.inference_mode():
                torch_ms = median_ms(lambda: encoder(x), args.warmup, args.repeats)  # noqa: B023
                diff = (torch.from_numpy(session.run(None, feed)[0]) - encoder(x)).abs().max().item()
            ort_ms = median_ms(lambda: session.run(None, feed), args.warmup, args.repeats)  # noqa: B023
            results["batches"][str(batch)] = {"torch_ms": torch_ms, "onnxruntime_ms": ort_ms,
                                              "torch_over_onnxruntime": torch_ms / ort_ms,
                                              "max_abs_diff": diff}
            log.info("batch %3d: PyTorch %.1f ms, ONNX Runtime %.1f ms (PyTorch/ORT %.2fx), max |diff| %.1e",
                     batch, torch_ms, ort_ms, torch_ms / ort_ms, diff)
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    results = run(args)
    log.info("%s at %d px, %d threads: %s", results["encoder"], results["img_size"], results["threads"],
             json.dumps(results["batches"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

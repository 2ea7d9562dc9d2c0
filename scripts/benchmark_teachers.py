#!/usr/bin/env python
"""Benchmark teacher feature extraction on CPU: ECGs/s (preprocessing vs network) and peak RSS.

Throughput: ECGFounder ``--config`` (default the full 12-lead network) at random weights, saved to a
temporary ``.pth`` and read back with ``load_ecgfounder`` so the real loading path runs, extracts
features for ``--records`` synthetic Symile ECGs (``write_symile_release``) in batches of
``--batch-size`` through ``pacx.teachers.Teacher`` (the ``ecg`` spec), exactly as extraction does: read the
rows from the ``.npy`` (page-cached), ``preprocess_ecg``, network. One warm-up batch is not timed. Reported:
overall ECGs/s and the time split between read, preprocessing (numpy/scipy) and network (torch).

Peak RSS: ``scripts/extract_teacher_features.py`` run as a subprocess on a synthetic split of the real
shape (``ecg_train.npy`` float32 [``--rss-records``, 1, 5000, 12], 2.4 GB at 10,000; its rows tile the
synthetic records) with both teachers and the extraction's default batch (64), measured with
``/usr/bin/time -v`` ("Maximum resident set size"). Without ``/usr/bin/time`` the child's VmHWM is
polled from ``/proc`` instead (``ru_maxrss`` of a child is not used: on Linux it keeps the parent's
high-water mark across ``exec``, so it would report this benchmark's own memory). The network used for
that run is ``--rss-config``; ``auto`` keeps ``--config`` unless a full pass would take longer than
``--rss-max-s`` at the measured rate, and then uses ``demo_small`` (RSS there is dominated by streaming
the data, not by the network). In that case ``--rss-check-records`` records are also run with
``--config`` (reported as ``peak_rss_config_mb``) to cover the full network's activations.

    python scripts/benchmark_teachers.py [--records 96] [--rss-records 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pacx.data.symile_files import FILES
from pacx.models.ecgfounder import ECGFOUNDER_CONFIGS, create_ecgfounder, load_ecgfounder
from pacx.models.labs_dae import LabsDAE
from pacx.teachers import DEFAULT_BATCH_SIZE, TEACHERS, Teacher, feature_path
from pacx.testing.symile import write_symile_release
from pacx.utils import write_text_atomic

log = logging.getLogger("benchmark_teachers")
EXTRACT = Path(__file__).resolve().parent / "extract_teacher_features.py"
TIME_BIN = Path("/usr/bin/time")
RSS_FALLBACK_CONFIG = "demo_small"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="12_lead", choices=sorted(ECGFOUNDER_CONFIGS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--records", type=int, default=96, help="timed records (after one warm-up batch)")
    p.add_argument("--rss-records", type=int, default=10_000, help="rows of the split for the RSS run")
    p.add_argument("--rss-config", default="auto", choices=["auto", *sorted(ECGFOUNDER_CONFIGS)])
    p.add_argument("--rss-max-s", type=float, default=180.0,
                   help="auto: longest acceptable full pass with --config before falling back to demo_small")
    p.add_argument("--rss-batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--rss-check-records", type=int, default=128,
                   help="records run with --config when the RSS run used another config (0: none)")
    p.add_argument("--rss-method", default="auto", choices=["auto", "time", "poll"])
    p.add_argument("--workdir", type=Path, default=None, help="keep data and weights here (default: temp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results as a flat JSON object")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ throughput


def save_random_ecgfounder(config: str, path: Path, seed: int) -> Path:
    """A randomly initialised ECGFounder (no head) in the official ``{'state_dict': ...}`` layout."""
    torch.manual_seed(seed)
    torch.save({"state_dict": create_ecgfounder(config, head=False).state_dict()}, path)
    return path


def time_throughput(weights: Path, config: str, ecg_path: Path, records: int, batch_size: int) -> dict:
    """ECGs/s of the ECG Teacher over the first ``records`` rows, split into read / preprocess / network."""
    teacher = Teacher(TEACHERS["ecg"], load_ecgfounder(weights, config))
    paths = {"ecg": ecg_path}
    teacher.features(paths, 0, min(batch_size, records))  # warm-up, not timed
    teacher.reset_timings()
    start = time.perf_counter()
    for a in range(0, records, batch_size):
        teacher.features(paths, a, min(a + batch_size, records))
    total = time.perf_counter() - start
    t = teacher.timings
    return {
        "ecg_per_s": records / total,
        "total_s": total,
        "read_s": t["read_s"],
        "preprocess_s": t["preprocess_s"],
        "network_s": t["network_s"],
        "preprocess_ecg_per_s": records / t["preprocess_s"],
        "network_ecg_per_s": records / t["network_s"],
    }


# ------------------------------------------------------------------------------------------ peak RSS


def _name(key: str, split: str) -> str:
    return next(s for s in FILES if s.key == key).filename(split)


def write_tiled_split(source: Path, out: Path, n: int, chunk: int = 256) -> Path:
    """``<out>/train/`` with ``n`` rows of ecg / labs / hadm_id, tiling the rows of ``<source>/train``.

    The ECG array is filled through ``open_memmap`` one chunk at a time, so this process never holds it.
    """
    src, dst = source / "train", out / "train"
    dst.mkdir(parents=True, exist_ok=True)
    for key in ("ecg", "labs_percentiles", "labs_missingness"):
        seed_rows = np.load(src / _name(key, "train"))
        arr = np.lib.format.open_memmap(dst / _name(key, "train"), "w+", seed_rows.dtype,
                                        (n, *seed_rows.shape[1:]))
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            arr[a:b] = seed_rows[np.arange(a, b) % len(seed_rows)]
        arr.flush()
        del arr
    np.save(dst / _name("hadm_id", "train"), 20_000_000 + np.arange(n, dtype=np.int64))
    return out


def _vm_hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_rss(cmd: list[str], method: str) -> tuple[float, float, str]:
    """(peak RSS in MB, wall seconds, method) of running ``cmd``; raises if it fails."""
    use_time = method == "time" or (method == "auto" and TIME_BIN.is_file())
    start = time.perf_counter()
    if use_time:
        proc = subprocess.run([str(TIME_BIN), "-v", *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"extraction failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        if found is None:
            raise RuntimeError(f"no 'Maximum resident set size' in the output of {TIME_BIN} -v")
        return int(found.group(1)) / 1024, wall, "/usr/bin/time -v"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:  # VmHWM is monotonic, so the last reading before exit is (nearly) the peak
        peak = max(peak, _vm_hwm_kb(proc.pid) or 0)
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"extraction failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    return peak / 1024, wall, "VmHWM polled from /proc every 50 ms"


def extraction_cmd(root: Path, weights: Path, config: str, dae: Path, batch_size: int) -> list[str]:
    return [sys.executable, str(EXTRACT), "--data-root", str(root), "--splits", "train", "--ecgfounder",
            str(weights), "--ecgfounder-config", config, "--labs-dae", str(dae), "--batch-size",
            str(batch_size), "--no-progress"]


def check_outputs(root: Path, n: int, ecg_dim: int) -> None:
    for teacher, dim in (("ecg", ecg_dim), ("labs", TEACHERS["labs"].width)):
        arr = np.load(feature_path(root, "train", teacher), mmap_mode="r")
        if arr.shape != (n, dim) or arr.dtype != np.float32:
            raise RuntimeError(f"{teacher}: extraction wrote {arr.dtype} {list(arr.shape)}, "
                               f"expected float32 {[n, dim]}")


# ------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace, work: Path) -> dict:
    n_seed = max(args.records, 16)  # unique synthetic records; the RSS split tiles them
    t0 = time.perf_counter()
    release = write_symile_release(work / "synthetic", n_train=n_seed, n_val=2, n_test_queries=2,
                                   n_candidates=2, cxr_size=16, seed=args.seed)
    log.info("wrote %d synthetic records in %.1f s", n_seed, time.perf_counter() - t0)
    weights = {args.config: save_random_ecgfounder(args.config, work / f"ecgfounder_{args.config}.pth",
                                                   args.seed)}
    torch.manual_seed(args.seed)
    dae = work / "labs_dae.pt"
    torch.save({"state_dict": LabsDAE().state_dict()}, dae)

    tp = time_throughput(weights[args.config], args.config, release / "train" / _name("ecg", "train"),
                         args.records, args.batch_size)
    full_pass_s = args.rss_records / tp["ecg_per_s"]
    rss_config = args.rss_config
    if rss_config == "auto":
        rss_config = args.config if full_pass_s <= args.rss_max_s else RSS_FALLBACK_CONFIG
    if rss_config not in weights:
        weights[rss_config] = save_random_ecgfounder(rss_config, work / f"ecgfounder_{rss_config}.pth",
                                                     args.seed)

    t0 = time.perf_counter()
    big = write_tiled_split(release, work / "rss", args.rss_records)
    log.info("wrote a %d-row split (%.2f GB of ECG) in %.1f s", args.rss_records,
             (big / "train" / _name("ecg", "train")).stat().st_size / 1e9, time.perf_counter() - t0)
    peak, wall, method = measure_rss(
        extraction_cmd(big, weights[rss_config], rss_config, dae, args.rss_batch_size), args.rss_method)
    check_outputs(big, args.rss_records, ECGFOUNDER_CONFIGS[rss_config].embed_dim)
    shutil.rmtree(big)
    result = {
        "config": args.config,
        "batch_size": args.batch_size,
        "records": args.records,
        "torch_threads": torch.get_num_threads(),
        **tp,
        "est_full_pass_s": full_pass_s,
        "peak_rss_mb": peak,
        "rss_records": args.rss_records,
        "rss_config": rss_config,
        "rss_batch_size": args.rss_batch_size,
        "rss_wall_s": wall,
        "rss_ecg_per_s": args.rss_records / wall,
        "rss_method": method,
    }
    if rss_config != args.config and args.rss_check_records > 0:
        check = write_tiled_split(release, work / "rss_check", args.rss_check_records)
        cpeak, cwall, _ = measure_rss(extraction_cmd(check, weights[args.config], args.config, dae,
                                                     args.rss_batch_size), args.rss_method)
        check_outputs(check, args.rss_check_records, ECGFOUNDER_CONFIGS[args.config].embed_dim)
        result.update(peak_rss_config_mb=cpeak, rss_check_records=args.rss_check_records,
                      rss_check_wall_s=cwall)
    return result


def table(r: dict) -> str:
    n = r["records"]
    lines = [
        f"ECG teacher extraction on CPU: ECGFounder {r['config']} (random weights via load_ecgfounder), "
        f"batch {r['batch_size']}, {n} records timed after 1 warm-up batch, "
        f"{r['torch_threads']} torch threads", f"{'phase':<34} {'seconds':>8} {'ECG/s':>8} {'share':>6}",
    ]
    for label, key in (("read rows (short-lived mmap)", "read_s"),
                       ("preprocess_ecg (numpy/scipy)", "preprocess_s"),
                       ("network (torch, inference_mode)", "network_s"), ("total", "total_s")):
        lines.append(f"{label:<34} {r[key]:>8.2f} {n / r[key]:>8.1f} {r[key] / r['total_s']:>6.0%}")
    lines.append(f"=> {r['ecg_per_s']:.1f} ECG/s; a {r['rss_records']}-record pass with {r['config']} "
                 f"would take ~{r['est_full_pass_s'] / 60:.1f} min")
    lines.append(f"Peak RSS of extract_teacher_features.py ({r['rss_method']}), ECG + labs teachers:")
    lines.append(f"{'run':<44} {'records':>8} {'batch':>6} {'peak RSS MB':>12} {'wall s':>8}")
    lines.append(f"{'ecg [N,1,5000,12] + labs, ECGFounder ' + r['rss_config']:<44} {r['rss_records']:>8} "
                 f"{r['rss_batch_size']:>6} {r['peak_rss_mb']:>12.0f} {r['rss_wall_s']:>8.1f}")
    if "peak_rss_config_mb" in r:
        lines.append(f"{'same, fewer rows, ECGFounder ' + r['config']:<44} {r['rss_check_records']:>8} "
                     f"{r['rss_batch_size']:>6} {r['peak_rss_config_mb']:>12.0f} "
                     f"{r['rss_check_wall_s']:>8.1f}")
    lines.append(f"target peak RSS < 2048 MB: {'met' if r['peak_rss_mb'] < 2048 else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="pacx_bench_teachers_") as tmp:
            result = run(args, Path(tmp))
    sys.stdout.write(table(result) + "\n")
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

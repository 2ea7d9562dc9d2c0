"""``generate_phantom``: every phantom release of the demo, from one seed, with size presets.

Each release draws from its own child of ``SeedSequence(seed)``, so the output is determined by the seed
and the sizes alone, whatever ``workers``. The output layout: docs/design.md#phantom-layout.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from pacx.demo.phantom.releases import RELEASES, PhantomSizes
from pacx.progress import progress
from pacx.utils import write_json_atomic

log = logging.getLogger(__name__)

PRESETS: dict[str, PhantomSizes] = {
    # The demo: ~8.7k 64 px CXRs in Stages 1 and 3; 2,300 Symile admissions (5,200 rows with retrieval
    # copies).
    "full": PhantomSizes(img_size=64, chexpert_train=4000, chexpert_valid=200, symile_train=2000,
                         symile_val=200, symile_test_queries=100, symile_candidates=10,
                         chexchonet_patients=1500, covidqu_seg=(600, 100, 200), tb_images=1000),
    # `python -m pacx.demo --quick`: every stage has a few batches per epoch.
    "demo_quick": PhantomSizes(img_size=64, chexpert_train=512, chexpert_valid=64, symile_train=384,
                               symile_val=64, symile_test_queries=24, symile_candidates=10,
                               chexchonet_patients=300, covidqu_seg=(96, 24, 48), tb_images=200),
    # Tests and smoke runs: seconds.
    "quick": PhantomSizes(img_size=64, chexpert_train=48, chexpert_valid=16, symile_train=160, symile_val=16,
                          symile_test_queries=12, symile_candidates=10, chexchonet_patients=100,
                          covidqu_seg=(24, 8, 8), tb_images=40),
}
TRUTH_DIR = "truth"
SUMMARY_FILE = "phantom.json"


def resolve_sizes(sizes: str | PhantomSizes, img_size: int | None = None) -> PhantomSizes:
    """A preset name or sizes, with ``img_size`` overriding the CXR size when given."""
    if isinstance(sizes, str):
        if sizes not in PRESETS:
            raise KeyError(f"unknown phantom preset {sizes!r}; known: {sorted(PRESETS)}")
        sizes = PRESETS[sizes]
    return sizes if img_size is None else dataclasses.replace(sizes, img_size=int(img_size))


def _write_release(name: str, raw: Path, seq: np.random.SeedSequence, sizes: PhantomSizes,
                   truth_path: Path) -> tuple[int, float]:
    """Write one release and its truth table; (rows, seconds). Runs in a worker process."""
    start = time.perf_counter()
    truth: pd.DataFrame = RELEASES[name].write(raw, seq, sizes)
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    truth.to_csv(truth_path, index=False)
    return len(truth), time.perf_counter() - start


def generate_phantom(out: str | Path, seed: int = 0, sizes: str | PhantomSizes = "full",
                     img_size: int | None = None, overwrite: bool = False,
                     workers: int = 2) -> dict[str, Path]:
    """Write every release under ``out``; returns ``{release name: raw folder}`` plus ``truth`` and
    ``summary``.

    A release folder that already exists is an error unless ``overwrite`` (then it is replaced).
    ``workers`` processes write releases concurrently (1: in this process).
    """
    out = Path(out)
    sizes = resolve_sizes(sizes, img_size)
    children = dict(zip(RELEASES, np.random.SeedSequence(seed).spawn(len(RELEASES))))
    paths = {name: out / release.subdir for name, release in RELEASES.items()}
    for raw in paths.values():
        if raw.exists():
            if not overwrite:
                raise FileExistsError(f"{raw} exists; pass overwrite=True to replace it")
            shutil.rmtree(raw)
        raw.mkdir(parents=True)
    jobs = {name: (name, paths[name], children[name], sizes, out / TRUTH_DIR / f"{name}.csv")
            for name in RELEASES}
    start = time.perf_counter()
    bar = dict(desc="phantom", unit="release")
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {name: pool.submit(_write_release, *job) for name, job in jobs.items()}
            done = {name: f.result() for name, f in progress(futures.items(), **bar)}
    else:
        done = {name: _write_release(*job) for name, job in progress(jobs.items(), **bar)}
    summary: dict = {"seed": seed, "sizes": dataclasses.asdict(sizes), "workers": workers,
                     "seconds": round(time.perf_counter() - start, 2), "releases": {}}
    for name, (rows, seconds) in done.items():
        release = RELEASES[name]
        log.info("phantom %s (stage %d): %d rows at %s in %.1f s", name, release.stage, rows, paths[name],
                 seconds)
        summary["releases"][name] = {"stage": release.stage, "path": str(paths[name]), "rows": rows,
                                     "seconds": round(seconds, 2)}
    write_json_atomic(out / SUMMARY_FILE, summary)
    log.info("phantom written at %s in %.1f s (seed %d, %d px)", out, summary["seconds"], seed,
             sizes.img_size)
    return {**paths, "truth": out / TRUTH_DIR, "summary": out / SUMMARY_FILE}

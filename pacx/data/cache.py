"""Decoded-image cache: the fast image path for CheXpert-scale pretraining.

Every image is decoded once (:func:`pacx.data.images.open_image`) into a uint8 memory map at a fixed square
size; augmentation runs per batch in the collate (:mod:`pacx.data.batched`). The cache layout (``images.npy``,
``index.csv``, ``meta.json``, ``done.npy``, ``sizes.npy``), its pixels and why it exists:
docs/design.md#image-cache. A cache built by another decoder version must be rebuilt.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from pacx.data.images import DECODER_VERSION, ImageDecodeError, open_image
from pacx.progress import progress as progress_bar

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: bit-depth-aware decoding (pacx.data.images); version 1 caches hold white 16-bit images
_PIL_MODES = {1: "L", 3: "RGB"}


class CacheError(ValueError):
    """An image cache (or an image it is built from) is unusable; the message names the file or directory."""


# ----------------------------------------------------------------------------------------------- building


def _strip(rel: str, components: int, row: int | None = None) -> str:
    """Drop leading path components (raw CheXpert CSVs start with the release folder)."""
    parts = Path(rel).parts
    if components >= len(parts):
        where = "" if row is None else f"row {row}: "
        raise CacheError(f"{where}cannot strip {components} component(s) from path {rel!r}")
    return str(Path(*parts[components:]))


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file and rename, so an interrupt never leaves a truncated file."""
    tmp = path.with_name(f".tmp_{path.name}")  # same suffix: np.save would append ".npy" otherwise
    write(tmp)
    os.replace(tmp, path)


def _write_state(out_dir: Path, meta: dict | None = None, paths: list[str] | None = None,
                 sizes: np.ndarray | None = None, done: np.ndarray | None = None) -> None:
    """Persist the given parts of the build state; sizes before done, so a done row has its size."""
    if sizes is not None:
        _atomic(out_dir / "sizes.npy", lambda p: np.save(p, sizes))
        if paths is not None:
            index = pd.DataFrame({"path": paths, "orig_width": sizes[:, 0], "orig_height": sizes[:, 1]})
            _atomic(out_dir / "index.csv", lambda p: index.to_csv(p, index=False))
    if done is not None:
        _atomic(out_dir / "done.npy", lambda p: np.save(p, done))
    if meta is not None:
        _atomic(out_dir / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))


def _read_meta(directory: Path) -> dict:
    try:
        return json.loads((directory / "meta.json").read_text())
    except FileNotFoundError as err:
        raise CacheError(f"{directory}: not an image cache (no meta.json); build it with "
                         "scripts/build_image_cache.py") from err
    except json.JSONDecodeError as err:
        raise CacheError(f"{directory}/meta.json: cannot parse: {err}") from err


def _check_source(out_dir: Path, meta: dict, source: dict) -> None:
    """A resumed build reads the image root and strip count that the cache's done rows were decoded from."""
    recorded = {k: meta[k] for k in source if k in meta}
    if not recorded:  # built before the cache recorded its source
        log.warning("%s: the cache does not record the image root its rows were decoded from (built by an "
                    "earlier pacx); resuming from %s, strip_components %d, without checking that it is the "
                    "same", out_dir, source["image_root"], source["strip_components"])
        return
    if recorded != source:
        raise CacheError(f"{out_dir}: its rows were decoded from {recorded}, but this build reads {source}; "
                         "a resumed cache must read the same files: give the same image root and "
                         "strip_components, or use another output directory")


_WORKER: dict = {}


def _init_worker(images_file: str, image_root: str, strip_components: int, size: int, channels: int) -> None:
    """Per-process state: the memory map opened r+ once, so each chunk only writes its rows."""
    _WORKER.update(images=np.load(images_file, mmap_mode="r+"), root=Path(image_root),
                   strip=strip_components, size=size, mode=_PIL_MODES[channels])


def _build_chunk(items: list[tuple[int, str]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Decode, resize and write the rows of one chunk; returns (rows, original (w, h) per row)."""
    images, size = _WORKER["images"], _WORKER["size"]
    rows, sizes = [], []
    for row, rel in items:
        path = _WORKER["root"] / _strip(rel, _WORKER["strip"], row)
        try:
            img = open_image(path, _WORKER["mode"])
            sizes.append(img.size)
            arr = np.asarray(TF.resize(img, [size, size], antialias=True))
        except (OSError, ImageDecodeError) as err:
            raise CacheError(f"row {row}: cannot read image {path}: {err}") from err
        images[row] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        rows.append(row)
    images.flush()  # rows are marked done only after they reach the file
    return rows, sizes


def build_image_cache(paths: Sequence[str], image_root: str | Path, out_dir: str | Path, size: int,
                      channels: int = 1, workers: int | None = None, chunk: int = 64,
                      strip_components: int = 0, progress: bool = True) -> Path:
    """Decode ``image_root / paths[i]`` once into ``out_dir`` (layout in the module docstring); returns it.

    ``paths`` are manifest values, stored verbatim as lookup keys; ``strip_components`` drops leading
    components only to find the file (raw CheXpert CSVs start with the release folder). Resumable: a rerun
    with the same arguments writes only rows not yet done, and the cache is marked complete only after
    every row is written. ``workers=0`` decodes in this process; ``None`` uses every CPU.
    """
    paths = [str(p) for p in paths]
    out_dir, image_root = Path(out_dir), Path(image_root)
    if channels not in _PIL_MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"image root is not a directory: {image_root}")
    dup = pd.Index(paths)[pd.Index(paths).duplicated()].unique().tolist()
    if dup:
        raise CacheError(f"{len(dup)} duplicated path(s) (first: {dup[:5]}); a cache row needs a unique key")
    n = len(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    want = {"version": CACHE_VERSION, "decoder": DECODER_VERSION, "size": size, "channels": channels,
            "count": n}
    # where the rows were read from: a resume must decode the same files (a manifest's relative paths are the
    # same in CheXpert-v1.0-small and the full-resolution release, so the keys alone do not tell)
    source = {"image_root": str(image_root.resolve()), "strip_components": strip_components}
    if (out_dir / "meta.json").is_file():  # resume
        meta = _read_meta(out_dir)
        old_paths = pd.read_csv(out_dir / "index.csv", keep_default_na=False, dtype={"path": str})["path"]
        if {k: meta.get(k) for k in want} != want or old_paths.tolist() != paths:
            raise CacheError(f"{out_dir}: holds a different cache ({ {k: meta.get(k) for k in want} }); "
                             "use another output directory or delete this one")
        _check_source(out_dir, meta, source)
    else:  # fresh build; meta.json is written last so a half-initialised directory reads as absent
        np.lib.format.open_memmap(out_dir / "images.npy", "w+", np.uint8, (n, channels, size, size)).flush()
        meta = {**want, **source, "complete": False}
        _write_state(out_dir, meta, paths, np.full((n, 2), -1, np.int32), np.zeros(n, bool))
    done, sizes = np.load(out_dir / "done.npy"), np.load(out_dir / "sizes.npy")
    todo = np.flatnonzero(~done)
    if todo.size == 0 and meta.get("complete"):
        log.info("%s: cache already complete (%d images at %d px)", out_dir, n, size)
        return out_dir
    recorded = {**want, **source}  # a cache built before pacx recorded its source gains it here
    _write_state(out_dir, {**recorded, "complete": False})
    # slow on network file systems
    checked = progress_bar(todo, desc="check files", unit="img", enabled=progress)
    missing = [i for i in checked if not (image_root / _strip(paths[i], strip_components, i)).is_file()]
    if missing:
        first = "; ".join(f"row {i}: {image_root / _strip(paths[i], strip_components)}" for i in missing[:5])
        raise CacheError(f"{len(missing)} image(s) not found under {image_root} (first: {first})")
    log.info("%s: decoding %d of %d images to %d px, %d channel(s)", out_dir, todo.size, n, size, channels)
    chunks = [[(int(i), paths[i]) for i in todo[s:s + chunk]] for s in range(0, todo.size, chunk)]
    init_args = (str(out_dir / "images.npy"), str(image_root), strip_components, size, channels)
    workers = (os.cpu_count() or 1) if workers is None else workers
    _run_chunks(chunks, init_args, workers, out_dir, done, sizes, progress)
    _write_state(out_dir, {**recorded, "complete": True}, paths, sizes)
    log.info("%s: cache complete (%d images)", out_dir, n)
    return out_dir


def _run_chunks(chunks, init_args, workers, out_dir, done, sizes, progress, save_every_s: float = 2.0):
    """Run chunks in a process pool, saving the done mask every few seconds and on any exit."""
    bar = progress_bar(total=len(done), initial=int(done.sum()), desc="cache", unit="img", enabled=progress)
    pool = None
    if workers > 0 and chunks:
        pool = mp.get_context().Pool(min(workers, len(chunks)), initializer=_init_worker, initargs=init_args)
        results = pool.imap_unordered(_build_chunk, chunks)
    else:
        _init_worker(*init_args)
        results = map(_build_chunk, chunks)
    last_save = time.monotonic()
    try:
        for rows, row_sizes in results:
            done[rows], sizes[rows] = True, row_sizes
            bar.update(len(rows))
            if time.monotonic() - last_save > save_every_s:
                _write_state(out_dir, sizes=sizes, done=done)
                last_save = time.monotonic()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _write_state(out_dir, sizes=sizes, done=done)
        bar.close()
        _WORKER.clear()


# ----------------------------------------------------------------------------------------------- reading


class ImageCache:
    """A complete cache opened read-only; ``cache[row]`` is ``(uint8 [C, S, S] array, (orig_w, orig_h))``.

    The memory map opens lazily in each process (DataLoader workers included) and is never pickled.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta = _read_meta(self.directory)
        if meta.get("version") != CACHE_VERSION or meta.get("decoder") != DECODER_VERSION:
            raise CacheError(f"{self.directory}: cache version {meta.get('version')} / decoder "
                             f"{meta.get('decoder')}, expected {CACHE_VERSION} / {DECODER_VERSION} "
                             "(bit-depth-aware decoding); rebuild it with scripts/build_image_cache.py")
        if not meta.get("complete"):
            raise CacheError(f"{self.directory}: cache is incomplete (interrupted build?); rerun "
                             "scripts/build_image_cache.py with the same arguments to finish it")
        self.size, self.channels, self.count = int(meta["size"]), int(meta["channels"]), int(meta["count"])
        # where its images were decoded from (None in caches built before pacx recorded it)
        self.image_root: str | None = meta.get("image_root")
        self.strip_components: int | None = meta.get("strip_components")
        index = pd.read_csv(self.directory / "index.csv", keep_default_na=False, dtype={"path": str})
        if len(index) != self.count:
            raise CacheError(f"{self.directory}/index.csv: {len(index)} rows, meta.json says {self.count}")
        self.paths: list[str] = index["path"].tolist()
        self.orig_sizes = index[["orig_width", "orig_height"]].to_numpy(np.int64)  # [N, 2] (w, h)
        shape, want = np.load(self.directory / "images.npy", mmap_mode="r").shape, (
            self.count, self.channels, self.size, self.size)
        if shape != want:
            raise CacheError(f"{self.directory}/images.npy: shape {shape}, meta.json says {want}")
        self._row_of: dict[str, int] | None = None
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.directory / "images.npy", mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None, "_row_of": None}

    def lookup(self, paths: Sequence[str]) -> np.ndarray:
        """Cache rows of manifest ``paths`` (int64 [len(paths)]); errors list the paths not cached."""
        if self._row_of is None:
            self._row_of = {p: i for i, p in enumerate(self.paths)}
        rows = np.fromiter((self._row_of.get(str(p), -1) for p in paths), np.int64, len(paths))
        if (rows < 0).any():
            bad = [str(paths[i]) for i in np.flatnonzero(rows < 0)]
            raise CacheError(f"{self.directory}: {len(bad)} path(s) not in the cache (first: {bad[:5]}); "
                             "rebuild it from a manifest that includes them")
        return rows

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row: int) -> tuple[np.ndarray, tuple[int, int]]:
        w, h = self.orig_sizes[row]
        return self.images[row], (int(w), int(h))


class CachedImageDataset(Dataset):
    """``(uint8 [C, S, S], original (w, h) int64 [2], float32 labels [K])`` for manifest ``paths``.

    No float work per sample: augmentation and normalisation happen per batch in ``BatchedCropFlip`` or
    ``BatchedResize``, passed as the DataLoader's ``collate_fn``.
    """

    def __init__(self, cache: ImageCache | str | Path, paths: Sequence[str], labels=None) -> None:
        self.cache = cache if isinstance(cache, ImageCache) else ImageCache(cache)
        self.rows = self.cache.lookup(paths)
        labels = torch.zeros(len(self.rows), 0) if labels is None else torch.as_tensor(labels)
        if len(labels) != len(self.rows):
            raise ValueError(f"{len(labels)} label rows for {len(self.rows)} paths")
        self.labels = labels.float().reshape(len(self.rows), -1)
        self.orig_sizes = torch.from_numpy(self.cache.orig_sizes[self.rows])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        img = torch.from_numpy(np.array(self.cache.images[self.rows[index]]))  # copy out of the mmap
        return img, self.orig_sizes[index], self.labels[index]

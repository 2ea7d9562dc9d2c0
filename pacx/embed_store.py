"""Where ``python -m pacx.embed`` keeps its work: the resumable shard folder (:class:`ShardStore`) and the
writers of the merged ``.npy`` / ``.parquet`` output (:data:`WRITERS`); layouts: docs/design.md#embed."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pacx.utils import save_npy_atomic, write_json_atomic, write_text_atomic

log = logging.getLogger("pacx.embed")


class EmbedError(RuntimeError):
    """The embedding run cannot go on or finish; the message says why and what to do."""


# ---- shards ------------------------------------------------------------------------------------------


# what a shard folder holds: its record, the shards, and the temporary files of atomic writes (tmp_path)
_OWN = r"(embed\.json|shard-\d{5,}\.(npy|json))"
OWN_FILE = re.compile(rf"{_OWN}|\.{_OWN}\.tmp\d+")  # matched in full


class ShardStore:
    """``<out>.shards/``: ``embed.json`` (what the shards were made from) and one ``shard-NNNNN.npy`` /
    ``.json`` pair per finished shard (the ``.npy`` is written last: it marks the shard done)."""

    def __init__(self, directory: Path, record: dict, n_images: int) -> None:
        self.directory, self.record = directory, record
        self.shard_size = record["shard_size"]
        self.n_shards = -(-n_images // self.shard_size)
        self.n_images = n_images

    def rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.n_images))

    def npy(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:05d}.npy"

    def open(self, overwrite: bool) -> None:
        """Start, or check that the folder was made for the same run (else :class:`EmbedError`)."""
        manifest = self.directory / "embed.json"
        if self.directory.is_dir() and not manifest.is_file():
            names = [p.name for p in self.directory.iterdir()]
            if any(not OWN_FILE.fullmatch(name) for name in names):
                raise EmbedError(f"{self.directory} exists but is not a pacx.embed shard folder (no "
                                 "embed.json); move it away or choose another --out")
            if names:  # a removal (after a merge, or --overwrite) was interrupted: unverifiable shards
                log.warning("%s holds %d files of an earlier run but no embed.json; discarding them",
                            self.directory, len(names))
                shutil.rmtree(self.directory)
        if overwrite and self.directory.exists():
            shutil.rmtree(self.directory)
        if manifest.is_file():
            old = json.loads(manifest.read_text())
            diff = [f"{key}: recorded {old.get(key)!r}, now {value!r}" for key, value in self.record.items()
                    if old.get(key) != value]
            if diff:
                raise EmbedError(f"{self.directory} holds shards of another run ({'; '.join(diff)}); rerun "
                                 "with --overwrite to discard them, or choose another --out")
        else:
            write_json_atomic(manifest, self.record)

    def load(self, shard: int, dim: int) -> tuple[np.ndarray, list[dict]] | None:
        """A finished shard's ``[rows, D]`` features and its unreadable images, or None (with a warning when
        the files are there but unusable)."""
        path = self.npy(shard)
        if not path.is_file():
            return None
        try:
            feats = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only, until rows are read
            failed = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError) as err:
            log.warning("%s is unreadable (%s); recomputing it", path, err)
            return None
        if feats.shape != (len(self.rows(shard)), dim) or feats.dtype != np.float32:
            log.warning("%s holds %s %s, expected float32 %s; recomputing it", path, feats.dtype, feats.shape,
                        (len(self.rows(shard)), dim))
            return None
        return feats, failed

    def write(self, shard: int, feats: np.ndarray, failed: list[dict]) -> None:
        write_json_atomic(self.npy(shard).with_suffix(".json"), failed)
        save_npy_atomic(self.npy(shard), feats)


# ---- outputs -----------------------------------------------------------------------------------------


def tmp_path(path: Path) -> Path:
    """A temporary name beside ``path`` (this process's), renamed over it when complete."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_npy(out: Path, paths: list[str], parts, dim: int, meta: dict) -> None:
    """float32 ``[N, D]`` (filled shard by shard through a memory map) + ``<out>.paths.txt``."""
    bad = [p for p in paths if "\n" in p or "\r" in p]
    if bad:
        raise EmbedError(f"{len(bad)} image path(s) hold a line break (first: {bad[0]!r}); use a "
                         ".parquet output")
    tmp = tmp_path(out)
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(paths), dim))
    start = 0
    for feats in parts:
        arr[start:start + len(feats)] = feats
        start += len(feats)
    arr.flush()
    del arr
    # two files, two renames: an old array never stays beside the new paths (a crash between leaves none)
    out.unlink(missing_ok=True)
    write_text_atomic(sidecar(out, ".paths.txt"), "".join(f"{p}\n" for p in paths))
    os.replace(tmp, out)


def write_parquet(out: Path, paths: list[str], parts, dim: int, meta: dict) -> None:
    """Columns ``path`` and ``embedding`` (fixed-size list of D float32), one row group per shard."""
    schema = pa.schema([("path", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
                       metadata={"pacx_embed": json.dumps(meta, sort_keys=True)})
    tmp = tmp_path(out)
    start = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for feats in parts:
            emb = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), dim)
            names = pa.array(paths[start:start + len(feats)], pa.string())
            writer.write_table(pa.table([names, emb], schema=schema))
            start += len(feats)
    os.replace(tmp, out)


WRITERS: dict[str, Callable] = {".npy": write_npy, ".parquet": write_parquet}


def sidecar(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)

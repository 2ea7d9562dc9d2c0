"""Embed a folder or manifest of chest X-rays with any encoder (``python -m pacx.embed ENCODER IMAGES``):

    python -m pacx.embed mae_encoder.safetensors xrays/ --out emb.parquet
    python -m pacx.embed runs/stage2/pacx_vitb_symile images.csv --root /data/images --out emb.npy

Inputs, pixels, outputs, resumable shards and unreadable images: docs/design.md#embed and ``--help``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pacx.data.images import DECODER_VERSION, ImageDecodeError, find_images, open_image
from pacx.data.manifest import ManifestError, read_manifest, require_rows, row_ref
from pacx.data.registry import BENCHMARKS
from pacx.data.transforms import resize_eval
from pacx.embed_store import WRITERS, EmbedError, ShardStore, sidecar, tmp_path
from pacx.models.load import load_encoder
from pacx.models.vit import ViTEncoder
from pacx.progress import NO_PROGRESS_HELP
from pacx.progress import progress as progress_bar
from pacx.utils import cores
from pacx.weights.checkpoint import CheckpointError, state_fingerprint

log = logging.getLogger("pacx.embed")  # also under `python -m pacx.embed`

SHARDS_FORMAT = 1
MAX_NAMED = 10  # unreadable files named in the error
# --precision -> the context the encoder runs in (Lightning's names; bf16-mixed = its autocast)
PRECISIONS: dict[str, Callable[[torch.device], AbstractContextManager]] = {
    "32": lambda device: nullcontext(),
    "bf16-mixed": lambda device: torch.autocast(device.type, dtype=torch.bfloat16),
}


class UnreadableImagesError(EmbedError):
    """Some images could not be read (and ``--skip-unreadable`` was not given)."""


# ---- inputs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageList:
    """The images in output order: ``paths`` as written to the output, read from ``root / path`` (an absolute
    path stays itself)."""

    paths: list[str]
    root: Path
    source: str

    @property
    def files(self) -> list[Path]:
        return [self.root / p for p in self.paths]


def path_column_candidates() -> list[str]:
    """Columns tried, in order, when ``--path-column`` is not given: ``path``, ``Path``, the registry's."""
    names = ["path", "Path", *(spec.path_column for spec in BENCHMARKS.values())]
    return list(dict.fromkeys(names))


def list_images(images: str | Path, path_column: str | None = None,
                root: str | Path | None = None) -> ImageList:
    """A folder (:func:`pacx.data.images.find_images`) or a manifest CSV (row order)."""
    images = Path(images)
    if images.is_dir():
        paths = find_images(images)
        bad = [p for p in paths if not _is_utf8(p)]
        if bad:
            raise EmbedError(f"{images}: {len(bad)} file name(s) are not UTF-8 (first: {bad[0]!r}); the "
                             "outputs store paths as UTF-8 text: rename them, or list the others in a "
                             "manifest CSV")
        return ImageList(paths, images, str(images))
    df = read_manifest(images)
    require_rows(len(df), str(images))
    if path_column is None:
        found = [c for c in path_column_candidates() if c in df.columns]
        if not found:
            raise ManifestError(f"{images}: no image path column (tried {path_column_candidates()}; columns "
                                f"present: {list(df.columns)}); name it with --path-column")
        path_column = found[0]
    elif path_column not in df.columns:
        raise ManifestError(f"{images}: no column {path_column!r}; columns present: {list(df.columns)}")
    column = df[path_column]
    blank = column.isna() | (column.astype(str).str.strip() == "")
    if blank.any():
        rows = ", ".join(row_ref(r) for r in np.flatnonzero(blank)[:5])
        raise ManifestError(f"{images}: {int(blank.sum())} blank {path_column!r} cell(s) ({rows})")
    base = Path(root) if root is not None else images.parent
    if not base.is_dir():
        raise FileNotFoundError(f"{images}: image root is not a directory: {base}")
    return ImageList(column.astype(str).tolist(), base, str(images))


def _is_utf8(path: str) -> bool:
    """False for a file name whose bytes are not UTF-8 (Python lists it with surrogate escapes)."""
    try:
        path.encode()
    except UnicodeEncodeError:
        return False
    return True


def images_hash(images: ImageList, transform: object) -> str:
    """SHA-256 of the image list (resolved root; each path with its size and mtime, or ``missing``), the
    transform and the decoder version: equal iff a rerun would read the same pixels in the same order."""
    h = hashlib.sha256(f"{images.root.resolve()}|{transform!r}|decoder "
                       f"{DECODER_VERSION}|{len(images.paths)}\n"
                       .encode())
    for path, file in zip(images.paths, images.files):
        try:
            st = file.stat()
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{path}|{stamp}\n".encode())
    return h.hexdigest()


def encoder_fingerprint(encoder: ViTEncoder) -> str:
    """Its weights and architecture (LayerNorm eps, pooling): equal iff it computes the same features."""
    arch = json.dumps({**encoder.cfg.to_dict(), "pool": encoder.pool}, sort_keys=True)
    return hashlib.sha256(f"{state_fingerprint(encoder)}|{arch}".encode()).hexdigest()


class ImageFiles(Dataset):
    """``(x [3, S, S], index, error)``: the evaluation pixels of image ``index`` and ``""``, or an empty
    tensor and the reason (``"<Error>: message"``) when it cannot be read."""

    def __init__(self, files: list[Path], transform: Callable) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            img = open_image(self.files[index], "RGB")
        except (OSError, ImageDecodeError, Image.DecompressionBombError) as err:
            return torch.zeros(0), index, f"{type(err).__name__}: {err}"
        return self.transform(img), index, ""


def collate(items: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor | None, list[int], list[str]]:
    """Stack the readable images only (``None`` when there are none); indices and errors for all items."""
    ok = [x for x, _, err in items if not err]
    return (torch.stack(ok) if ok else None), [i for _, i, _ in items], [err for _, _, err in items]


# ---- the run -----------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_workers() -> int:
    """Decoding processes when not given: the CPUs this process may use, at most 8."""
    return min(8, cores())


def embed_images(
    encoder: str | Path,
    images: str | Path,
    out: str | Path,
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int | None = None,
    shard_size: int = 4096,
    precision: str = "32",
    skip_unreadable: bool = False,
    overwrite: bool = False,
    keep_shards: bool = False,
    path_column: str | None = None,
    root: str | Path | None = None,
    progress: bool = True,
    allow_debug: bool | None = None,
) -> Path:
    """Embed ``images`` with ``encoder`` into ``out`` (the module docstring has the formats and the resume
    rules); returns ``out``."""
    out = Path(out)
    if out.suffix.lower() not in WRITERS:
        raise EmbedError(f"--out {out}: unknown output format {out.suffix!r}; use one of {sorted(WRITERS)}")
    if precision not in PRECISIONS:
        raise EmbedError(f"unknown precision {precision!r}; known: {sorted(PRECISIONS)}")
    if batch_size < 1 or shard_size < 1:
        raise EmbedError(f"batch size and shard size must be positive, got {batch_size} and {shard_size}")
    if out.exists() and not overwrite:
        raise EmbedError(f"{out} exists; pass --overwrite to recompute it")
    image_list = list_images(images, path_column, root)
    model = load_encoder(encoder, allow_debug=allow_debug)
    transform = resize_eval(model.cfg.img_size)
    dim, n = model.embed_dim, len(image_list.paths)
    record = {"format": SHARDS_FORMAT, "n_images": n, "images_sha256": images_hash(image_list, transform),
              "encoder_sha256": encoder_fingerprint(model), "img_size": model.cfg.img_size, "embed_dim": dim,
              "precision": precision, "shard_size": shard_size}
    store = ShardStore(sidecar(out, ".shards"), record, n)
    store.open(overwrite)
    todo = [k for k in range(store.n_shards) if store.load(k, dim) is None]
    torch_device = resolve_device(device)
    num_workers = default_workers() if num_workers is None else num_workers
    log.info("embedding %d images of %s with %s (%d-d, %d px) on %s (precision %s, %d workers): "
             "%d of %d shards to compute", n, image_list.source, encoder, dim, model.cfg.img_size,
             torch_device, precision, num_workers, len(todo), store.n_shards)
    model.to(torch_device)
    computed = sum(len(store.rows(k)) for k in todo)
    start = time.perf_counter()
    _compute_shards(model, ImageFiles(image_list.files, transform), store, todo, image_list.paths, batch_size,
                    num_workers, torch_device, PRECISIONS[precision], progress)
    if computed:
        elapsed = time.perf_counter() - start
        log.info("computed %d images in %.1f s (%.1f images/s)", computed, elapsed,
                 computed / max(elapsed, 1e-9))
    _merge(store, image_list.paths, out, dim, skip_unreadable, record)
    if not keep_shards:
        shutil.rmtree(store.directory)
    return out


def _compute_shards(model: ViTEncoder, dataset: ImageFiles, store: ShardStore, todo: list[int],
                    paths: list[str], batch_size: int, num_workers: int, device: torch.device,
                    forward_context: Callable[[torch.device], AbstractContextManager],
                    progress: bool) -> None:
    """Run the encoder over the rows of the ``todo`` shards, writing each shard as soon as it is complete."""
    if not todo:
        return
    batches = [list(rows[i:i + batch_size]) for k in todo for rows in [store.rows(k)]
               for i in range(0, len(rows), batch_size)]  # no batch crosses a shard boundary
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    done = store.n_images - sum(len(store.rows(k)) for k in todo)
    bar = progress_bar(total=store.n_images, initial=done, unit="img", desc="embed", enabled=progress)
    feats: list[np.ndarray] = []
    failed: list[dict] = []
    with torch.inference_mode(), bar:
        for x, indices, errors in loader:
            batch = np.full((len(indices), store.record["embed_dim"]), np.nan, np.float32)  # [b, D]
            ok = [j for j, err in enumerate(errors) if not err]
            if x is not None:
                with forward_context(device):
                    batch[ok] = model(x.to(device, non_blocking=True)).float().cpu().numpy()
            failed += [{"index": indices[j], "path": paths[indices[j]], "reason": err}
                       for j, err in enumerate(errors) if err]
            feats.append(batch)
            bar.update(len(indices))
            shard = indices[0] // store.shard_size
            if indices[-1] == store.rows(shard)[-1]:  # the shard's last batch
                store.write(shard, np.concatenate(feats), failed)
                feats, failed = [], []


def _merge(store: ShardStore, paths: list[str], out: Path, dim: int, skip_unreadable: bool,
           record: dict) -> None:
    """Check the unreadable images, then write ``out`` from the shards (and the sidecars) atomically."""
    failed = []
    for k in range(store.n_shards):
        loaded = store.load(k, dim)
        if loaded is None:
            raise EmbedError(f"{store.npy(k)} is missing after the run; rerun to compute it")
        failed += loaded[1]
    if failed and not skip_unreadable:
        named = "; ".join(f"{f['path']} ({f['reason']})" for f in failed[:MAX_NAMED])
        more = f" and {len(failed) - MAX_NAMED} more" if len(failed) > MAX_NAMED else ""
        kept = f" ({out} is an earlier run's, left as it was)" if out.exists() else ""
        raise UnreadableImagesError(
            f"{len(failed)} of {len(paths)} images could not be read: {named}{more}. No output was "
            f"written{kept}; "
            f"the shards of the readable images are kept in {store.directory}, so a rerun with "
            "--skip-unreadable (which leaves these images out and lists them) only merges them")
    if len(failed) == len(paths):
        raise UnreadableImagesError(f"none of the {len(paths)} images could be read (first: "
                                    f"{failed[0]['path']}: {failed[0]['reason']})")
    bad = {f["index"] for f in failed}
    keep = [p for i, p in enumerate(paths) if i not in bad]

    def parts():
        for k in range(store.n_shards):
            feats, _ = store.load(k, dim)
            yield feats[np.array([i not in bad for i in store.rows(k)], dtype=bool)]

    unreadable_csv = sidecar(out, ".unreadable.csv")
    if failed:
        unreadable_csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"path": [f["path"] for f in failed], "reason": [f["reason"] for f in failed]}).to_csv(
            tmp_path(unreadable_csv), index=False)
        os.replace(tmp_path(unreadable_csv), unreadable_csv)
        log.warning("%d of %d images could not be read and are left out of %s; they are listed in %s",
                    len(failed), len(paths), out, unreadable_csv)
    elif unreadable_csv.exists():
        unreadable_csv.unlink()  # from an earlier run over other files
    out.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[out.suffix.lower()](out, keep, parts(), dim, {**record, "n_rows": len(keep)})
    log.info("wrote %d × %d embeddings to %s", len(keep), dim, out)


# ---- CLI ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacx.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoder",
                        help="run directory, checkpoint or exported .safetensors (pacx.load_encoder)")
    parser.add_argument("images", help="folder of images (recursive) or manifest CSV")
    parser.add_argument("--out", required=True, help="output file: .npy or .parquet")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="image decoding processes (0: in this one; default: the CPUs available, "
                             "at most 8)")
    parser.add_argument("--shard-size", type=int, default=4096, help="images per resumable shard")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="32",
                        help="32 (float32) or bf16-mixed (bfloat16 autocast, as Stage 3 on GPUs)")
    parser.add_argument("--path-column",
                        help=f"the CSV's image column (default: the first of {path_column_candidates()})")
    parser.add_argument("--root",
                        help="folder that a CSV's relative paths start from (default: the CSV's folder)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="leave unreadable images out and list them in <out>.unreadable.csv")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute: discard existing shards and output")
    parser.add_argument("--keep-shards", action="store_true", help="keep <out>.shards/ after the merge")
    parser.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    parser.add_argument("--allow-debug", action="store_true", help="accept the encoder of a debug run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = embed_images(args.encoder, args.images, args.out, batch_size=args.batch_size,
                           device=args.device,
                           num_workers=args.num_workers, shard_size=args.shard_size, precision=args.precision,
                           skip_unreadable=args.skip_unreadable, overwrite=args.overwrite,
                           keep_shards=args.keep_shards, path_column=args.path_column, root=args.root,
                           progress=not args.no_progress,
                           allow_debug=args.allow_debug or None)
    except (EmbedError, ManifestError, CheckpointError, FileNotFoundError) as err:
        log.error("%s", err)
        return 1
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

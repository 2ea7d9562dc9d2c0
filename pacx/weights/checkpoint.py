"""Safe, loud checkpoint loading (docs/method.md#conventions): pickles only with ``weights_only=True``
(:func:`safe_torch_load`), safetensors by :mod:`safetensors`, prefixes stripped by a pure function
(:func:`strip_prefix`), and :func:`load_state_checked`, which raises unless the missing / unexpected keys are
exactly the expected sets and every shape matches. :func:`resolve_run_checkpoint` turns a run directory into
the checkpoint its ``run.json`` names.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from pacx.debug import check_not_debug
from pacx.run_record import RUN_JSON, read_run_record

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is unsafe, of the wrong kind, or does not fit the model; the message says which."""


class PickleRefused(CheckpointError):
    """``weights_only=True`` refused a pickle: it holds objects other than tensors and plain containers (or
    is not a pickle at all). Only this error may be answered by an explicit opt-in to a full unpickle."""


def safe_torch_load(path: str | Path) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise PickleRefused(
            f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers "
            f"(torch.load weights_only=True rejected it: {str(err).splitlines()[0]}). Only load pickles you "
            "trust, and convert them to safetensors once."
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from err


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    return tensors, meta


def is_safetensors_file(path: str | Path) -> bool:
    """Whether ``path`` holds safetensors by content (an 8-byte little-endian header size, then the JSON
    header), whatever its name: an export written as ``encoder.bin`` is no pickle."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(9)
    return (len(head) == 9 and head[8:9] == b"{"
            and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size)


def save_safetensors(state: Mapping[str, torch.Tensor], out: str | Path,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``state`` (with string ``metadata``) to the safetensors file ``out`` atomically: a temporary file
    beside it, then a rename, so a crash never leaves a truncated file under the final name. Its folder is
    created; tensors are stored contiguous (shared storage is copied)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # two writers never share it
    try:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def load_any(path: str | Path) -> tuple[object, dict[str, str]]:
    """Load a weights file: (tensors dict, metadata) for safetensors (by extension or content), (object, {})
    for pickles."""
    path = Path(path)
    if path.suffix == ".safetensors" or is_safetensors_file(path):
        return load_safetensors(path)
    return safe_torch_load(path), {}


def state_fingerprint(module: nn.Module) -> str:
    """Hash of every tensor in ``module.state_dict()`` (name, dtype, shape and bytes): equal iff the weights
    are."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys starting with ``prefix``, with it removed; other keys are dropped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def drop_keys(state: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> tuple[dict, list[str]]:
    """Split off keys starting with any of ``prefixes``; returns (kept state, dropped key names)."""
    prefixes = tuple(prefixes)
    kept = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    return kept, sorted(k for k in state if k.startswith(prefixes))


def load_state_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    expected_missing: Iterable[str] = (),
    expected_unexpected: Iterable[str] = (),
) -> None:
    """Load ``state`` into ``module``; raise unless key sets are exactly as expected and shapes match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:20]))
    for kind, found, expected in (("missing", missing, expected_missing), ("unexpected", unexpected,
                                                                        expected_unexpected)):
        found, expected = set(found), set(expected)
        if found - expected:
            problems.append(f"{kind} keys {_short(found - expected)}")
        if expected - found:
            problems.append(f"expected {kind} keys that are not {kind} {_short(expected - found)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit {module.__class__.__name__}"
            f"{_arch_hint(module)}: " + " | ".join(problems)
        )
    module.load_state_dict(state, strict=False)  # key sets asserted exactly above
    if expected_missing or expected_unexpected:
        log.info("%s: loaded; left out as expected: %d missing, %d unexpected keys", source,
                 len(missing), len(unexpected))


def _short(keys: set[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" … (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + more + "]"


def _arch_hint(module: nn.Module) -> str:
    cfg = getattr(module, "cfg", None)
    return f" ({cfg})" if cfg is not None else ""


def resolve_run_checkpoint(run_dir: Path, which: str = "last", allow_debug: bool | None = None) -> Path:
    """The checkpoint a run directory's ``run.json`` names (``last`` by default, as Stage 3 uses), inside
    ``run_dir`` when it was inside the run (a copied or moved run reads its own); a debug run is refused
    unless allowed (:func:`pacx.debug.check_not_debug`)."""
    run_dir = Path(run_dir)
    info_path = run_dir / RUN_JSON
    if not info_path.is_file():
        raise FileNotFoundError(f"{run_dir} is a directory without run.json; pass a checkpoint or weights "
                                "file")
    info = read_run_record(run_dir)
    check_not_debug(info.get("debug"), f"run directory {run_dir}", allow_debug)
    ckpt = (info.get("checkpoints") or {}).get(which)
    if not ckpt:
        raise CheckpointError(f"{info_path}: names no {which!r} checkpoint (status {info.get('status')!r})")
    path = Path(ckpt)
    recorded_dir = Path(info.get("run_dir") or run_dir)  # where the run was when it wrote run.json
    if path.is_absolute() and path.is_relative_to(recorded_dir):
        # a checkpoint inside the run, named by absolute path: read it in this directory, which may be a
        # copy or a move of that one (the original may since hold other weights, or be gone)
        path = path.relative_to(recorded_dir)
    if not path.is_absolute():
        path = run_dir / path
    return path


def checkpoint_file(path: str | Path, which: str = "last") -> Path:
    """``path`` itself, or for a run directory the checkpoint its ``run.json`` names
    (:func:`resolve_run_checkpoint`)."""
    path = Path(path)
    return resolve_run_checkpoint(path, which) if path.is_dir() else path

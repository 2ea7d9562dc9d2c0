"""The encoder weight formats pacx reads and writes (docs/method.md#conventions): a registry of detectors
(first match wins) that turns a run directory, checkpoint, export or third-party file into timm-layout
encoder tensors plus what is known of them (:class:`EncoderWeights`), and the export format's metadata and
file. No network is built here: :mod:`pacx.models.load` builds one, :func:`pacx.share.export_encoder` exports.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pacx.debug import check_not_debug
from pacx.run_record import RUN_JSON
from pacx.utils import git_sha, portable_source
from pacx.weights.checkpoint import (
    CheckpointError,
    checkpoint_file,
    drop_keys,
    load_any,
    resolve_run_checkpoint,
    save_safetensors,
    strip_prefix,
)
from pacx.weights.layout import (
    DECODER_KEY_PREFIXES,
    HEAD_KEY_PREFIXES,
    ViTConfig,
    config_from_state_dict,
    merge_lora_state,
)

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = "1"
MODEL_FOLDER_WEIGHTS = "model.safetensors"  # the weights file of a timm / Hub model folder


@dataclass
class EncoderWeights:
    """Encoder tensors in timm layout plus what is known about them."""

    state: dict[str, torch.Tensor]
    cfg: ViTConfig | None  # None: infer from the tensor shapes when needed
    fmt: str
    source: str
    stage: str = "unknown"
    dropped: list[str] = field(default_factory=list)
    debug: dict = field(default_factory=dict)  # debug flags of the run that made it (pacx.debug)
    global_step: int | None = None  # the training step and epoch of the checkpoint the tensors are from
    epoch: int | None = None
    origin: dict[str, str] = field(default_factory=dict)  # a pacx export: the checkpoint it was made from


# ---- per-stage extraction from our own Lightning checkpoints ------------------------------------
# stage -> function(lightning state_dict, the checkpoint's "pacx" block) -> encoder state dict in timm
# layout.
StageExtractor = Callable[[Mapping[str, torch.Tensor], dict], dict[str, torch.Tensor]]
STAGE_ENCODER_EXTRACTORS: dict[str, StageExtractor] = {}


def register_stage_extractor(stage: str):
    def deco(fn):
        STAGE_ENCODER_EXTRACTORS[stage] = fn
        return fn

    return deco


@register_stage_extractor("stage1_mae")
def _stage1_encoder(state: Mapping[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    return drop_keys(strip_prefix(state, "model."), DECODER_KEY_PREFIXES)[0]


@register_stage_extractor("stage2_pacx")
def _stage2_encoder(state: Mapping[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    # only the encoder is read: the heads, in either layout (proj.<teacher> or the earlier proj_<teacher>;
    # pacx.models.heads.upgrade_head_keys), are dropped with every other non-encoder key
    encoder = strip_prefix(state, "cxr_encoder.")
    if meta.get("tuning") == "lora":
        return merge_lora_state(encoder, meta["lora_alpha"] / meta["lora_r"])
    return encoder


# ---- format detectors ------------------------------------------------------------------------------


def _is_tensor_map(obj: object) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _from_pacx_checkpoint(obj: dict, source: str) -> EncoderWeights:
    meta = obj["pacx"]
    stage = meta.get("stage")
    if stage not in STAGE_ENCODER_EXTRACTORS:
        raise CheckpointError(f"{source}: pacx checkpoint of stage {stage!r} holds no encoder pacx can "
                              "extract")
    state = STAGE_ENCODER_EXTRACTORS[stage](obj["state_dict"], meta)
    return EncoderWeights(state, ViTConfig(**meta["vit_config"]), "pacx_checkpoint", source, stage,
                          debug=dict(meta.get("debug") or {}), global_step=obj.get("global_step"),
                          epoch=obj.get("epoch"))


def _from_authors_stage1(obj: dict, source: str) -> EncoderWeights:
    state, dropped = drop_keys(strip_prefix(obj["state_dict"], "model."), DECODER_KEY_PREFIXES)
    return EncoderWeights(state, None, "authors_stage1", source, "stage1_mae", dropped)


def _from_mae_release(obj: dict, source: str) -> EncoderWeights:
    state, dropped = drop_keys(obj["model"], DECODER_KEY_PREFIXES + HEAD_KEY_PREFIXES)
    return EncoderWeights(state, None, "mae_release", source, "mae_release", dropped)


def _from_timm(obj: dict, source: str) -> EncoderWeights:
    state, dropped = drop_keys(obj, HEAD_KEY_PREFIXES)
    return EncoderWeights(state, None, "timm", source, "timm", dropped)


AUTHORS_STAGE2_PREFIX = "cxr_encoder.base_model.model."
AUTHORS_LORA_SCALING = 16 / 8  # their LoRA: r 8, alpha 16
AUTHORS_STAGE2_NORM_EPS = 1e-5  # their Stage 2/3 encoder class used PyTorch's default LayerNorm eps


def _from_authors_stage2(obj: dict, source: str) -> EncoderWeights:
    peft_state = strip_prefix(obj["state_dict"], "cxr_encoder.")
    state = merge_lora_state(peft_state, AUTHORS_LORA_SCALING)
    cfg = config_from_state_dict(state, norm_eps=AUTHORS_STAGE2_NORM_EPS)
    dropped = sorted(k for k in obj["state_dict"] if not k.startswith("cxr_encoder."))
    return EncoderWeights(state, cfg, "authors_stage2", source, "stage2_pacx", dropped)


def _is_authors_stage2(obj: object) -> bool:
    sd = obj.get("state_dict") if isinstance(obj, Mapping) else None
    return _is_tensor_map(sd) and f"{AUTHORS_STAGE2_PREFIX}cls_token" in sd and "pacx" not in obj


def _is_authors_stage1(obj: object) -> bool:
    sd = obj.get("state_dict") if isinstance(obj, Mapping) else None
    return _is_tensor_map(sd) and "model.cls_token" in sd and "pacx" not in obj


def _is_pacx_checkpoint(obj: object) -> bool:
    return isinstance(obj, Mapping) and "pacx" in obj and "state_dict" in obj


# The formats :func:`read_encoder_weights` recognises by content, first match wins (before them, a pacx
# export: safetensors whose metadata holds ``pacx_vit_config``; a run directory names its checkpoint):
#   pacx_checkpoint  our Lightning checkpoint (a ``pacx`` block names stage + architecture)
#   authors_stage1   the authors' Stage 1 Lightning file: MAE under ``model.``, decoder too
#   authors_stage2   the authors' Stage 2 Lightning file: peft-LoRA encoder under
#                    ``cxr_encoder.base_model.model.`` (r 8, alpha 16; merged; eps 1e-5)
#   mae_release      official MAE release ``{'model': {...}}``, with or without decoder
#   timm             a plain timm ViT state dict / safetensors (``head.*`` dropped)
# Dropped keys (decoder, classification head) are dropped explicitly; the architecture of a third-party
# file is inferred from its tensor shapes (config_from_state_dict).
Detector = Callable[[object], bool]
Extractor = Callable[[dict, str], EncoderWeights]
CHECKPOINT_FORMATS: list[tuple[str, Detector, Extractor]] = [
    ("pacx_checkpoint", _is_pacx_checkpoint, _from_pacx_checkpoint),
    ("authors_stage1", _is_authors_stage1, _from_authors_stage1),
    ("authors_stage2", _is_authors_stage2, _from_authors_stage2),
    ("mae_release", lambda o: isinstance(o, Mapping) and _is_tensor_map(o.get("model")), _from_mae_release),
    ("timm", lambda o: _is_tensor_map(o) and "cls_token" in o, _from_timm),
]


def register_checkpoint_format(name: str, detect: Detector, extract: Extractor, first: bool = True) -> None:
    """Add a third-party format (later stages use this for their own files)."""
    CHECKPOINT_FORMATS.insert(0 if first else len(CHECKPOINT_FORMATS), (name, detect, extract))


def read_encoder_weights(path: str | Path, which: str = "last",
                         allow_debug: bool | None = None) -> EncoderWeights:
    """Detect the file's format and return its encoder tensors and architecture (no module built).

    A debug run (``fast_dev_run``, ``overfit_batches``, ``limit_*``; :mod:`pacx.debug`) is refused, whether
    named by its run directory (``run.json``), a checkpoint (``pacx.debug``) or an export (metadata
    ``debug``), unless ``allow_debug`` or the caller runs inside :func:`pacx.debug.allow_debug_runs`."""
    path = Path(path)
    if path.is_dir() and not (path / RUN_JSON).is_file() and (path / MODEL_FOLDER_WEIGHTS).is_file():
        path = path / MODEL_FOLDER_WEIGHTS  # a model folder (scripts/export_encoder.py --format timm)
    elif path.is_dir():
        path = resolve_run_checkpoint(path, which, allow_debug)
    obj, meta = load_any(path)
    source = str(path)
    if "pacx_vit_config" in meta:
        weights = EncoderWeights(obj, ViTConfig(**json.loads(meta["pacx_vit_config"])), "pacx_export",
                                 source, meta.get("stage", "unknown"),
                                 debug=json.loads(meta.get("debug") or "{}"), origin=export_origin(meta),
                                 global_step=_int_or_none(meta.get("global_step")),
                                 epoch=_int_or_none(meta.get("epoch")))
        check_not_debug(weights.debug, f"encoder export {path}", allow_debug)
        return weights
    for name, detect, extract in CHECKPOINT_FORMATS:
        if detect(obj):
            weights = extract(obj, source)
            check_not_debug(weights.debug, f"checkpoint {path}", allow_debug)
            if weights.dropped:
                log.info("%s (%s): dropped %d non-encoder keys (%s…)", source, name, len(weights.dropped),
                         weights.dropped[0])
            return weights
    top = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"{source}: not an encoder format pacx knows (top-level keys: {top})")


def read_mae_state(path: str | Path, which: str = "last") -> tuple[dict[str, torch.Tensor], str]:
    """Full MAE tensors (encoder + decoder when the file has one) for initialising a Stage 1 model.

    Accepts our Stage 1 checkpoints and run directories, the authors' Stage 1 files and official MAE
    release files; any encoder-only format yields the encoder alone. Returns (state, format name).
    """
    path = checkpoint_file(path, which)
    obj, meta = load_any(path)
    if isinstance(obj, Mapping) and obj.get("pacx", {}).get("stage") == "stage1_mae":
        check_not_debug(obj["pacx"].get("debug"), f"checkpoint {path}")
        return strip_prefix(obj["state_dict"], "model."), "pacx_checkpoint"
    if not meta and _is_authors_stage1(obj):
        return strip_prefix(obj["state_dict"], "model."), "authors_stage1"
    if not meta and isinstance(obj, Mapping) and _is_tensor_map(obj.get("model")):
        return drop_keys(obj["model"], HEAD_KEY_PREFIXES)[0], "mae_release"
    weights = read_encoder_weights(path, which)
    return weights.state, weights.fmt


# ---- the export format ------------------------------------------------------------------------------

ORIGIN_FIELDS = ("source", "source_run", "source_sha256", "source_format")  # saved as origin_<field>


def export_origin(meta: Mapping[str, str]) -> dict[str, str]:
    """The first file of a chain of exports (the checkpoint), from the metadata of one of them: its own
    ``origin_*`` fields, else its ``source*`` fields (an export made from the file it names)."""
    if any(f"origin_{k}" in meta for k in ORIGIN_FIELDS):
        return {k: meta[f"origin_{k}"] for k in ORIGIN_FIELDS if f"origin_{k}" in meta}
    return {k: meta[k] for k in ORIGIN_FIELDS if k in meta}


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def export_metadata(weights: EncoderWeights, cfg: ViTConfig) -> dict[str, str]:
    """The safetensors metadata of a pacx export of ``weights`` with architecture ``cfg``.

    ``timm_model`` + ``timm_kwargs`` rebuild it in timm (strict keys), ``pacx_vit_config`` in pacx. The source
    is named without absolute paths: ``source`` is the checkpoint's path inside its run directory (e.g.
    ``checkpoints/last.ckpt``) or its file name, with ``source_sha256`` and ``source_run`` (the run
    directory's name, when there is one). ``global_step`` and ``epoch`` are the checkpoint's. An export made
    from an export keeps the checkpoint it came from as ``origin_source``, ``origin_source_run``,
    ``origin_source_sha256`` and ``origin_source_format``. A debug run's export carries its ``debug`` flags.
    """
    meta = {
        "format": "pacx-encoder",
        "format_version": EXPORT_FORMAT_VERSION,
        "pacx_vit_config": json.dumps(cfg.to_dict()),
        "stage": weights.stage,
        **portable_source(weights.source),
        "source_format": weights.fmt,
        "git_sha": git_sha(),
        "architecture": f"ViT(embed_dim={cfg.embed_dim}, depth={cfg.depth}, heads={cfg.num_heads}, "
        f"patch={cfg.patch_size}, img={cfg.img_size})",
        "img_size": str(cfg.img_size),
        "patch_size": str(cfg.patch_size),
    }
    meta["timm_model"] = cfg.timm_model
    meta["timm_kwargs"] = json.dumps(cfg.timm_kwargs())
    meta["norm_eps"] = repr(cfg.norm_eps)
    for key in ("global_step", "epoch"):  # of the checkpoint, not of its run's end (--which best)
        if getattr(weights, key) is not None:
            meta[key] = str(getattr(weights, key))
    meta.update({f"origin_{k}": v for k, v in weights.origin.items()})
    if weights.debug:
        meta["debug"] = json.dumps(weights.debug, sort_keys=True)
    return meta


def write_export(state: Mapping[str, torch.Tensor], meta: Mapping[str, str], out: str | Path) -> Path:
    """Write ``state`` with ``meta`` to the safetensors file ``out`` atomically (a temporary file, then a
    rename); its folder is created."""
    return save_safetensors(state, out, meta)

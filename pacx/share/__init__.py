"""Share and serve an encoder: a timm model folder (for the Hugging Face Hub) and an ONNX file.

Both start from anything ``pacx.load_encoder`` reads and carry pacx's export metadata.
:func:`export_timm_folder` writes ``config.json``, ``model.safetensors`` and a ``README.md`` card, for
``timm.create_model("local-dir:FOLDER", pretrained=True)``; :func:`export_onnx` writes one ``.onnx`` file
(``pixel_values`` → ``features``; the optional ``serve`` extra). Formats and choices: docs/design.md#sharing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision.transforms import InterpolationMode, v2

from pacx.data.leakage import export_admissions
from pacx.data.transforms import resize_eval
from pacx.models.load import build_encoder, load_encoder
from pacx.models.vit import ViTEncoder
from pacx.share.card import TIMM_NORM_EPS, model_card, run_provenance
from pacx.weights.formats import (
    MODEL_FOLDER_WEIGHTS,
    EncoderWeights,
    export_metadata,
    read_encoder_weights,
    write_export,
)

log = logging.getLogger(__name__)

TIMM_WEIGHTS = MODEL_FOLDER_WEIGHTS
TIMM_CONFIG = "config.json"
MODEL_CARD = "README.md"
TIMM_FOLDER_FILES = (TIMM_CONFIG, TIMM_WEIGHTS, MODEL_CARD)  # all a timm folder export holds
ONNX_OPSET = 17
ONNX_INPUT, ONNX_OUTPUT = "pixel_values", "features"
PARITY_ATOL = 1e-4  # timm / ONNX Runtime vs pacx features, float32 on CPU (measured: about 1e-6)

# pacx pool (pacx.models.vit.POOLS) -> the timm VisionTransformer arguments that compute the same feature.
TIMM_POOLS: dict[str, dict] = {
    "cls": {"global_pool": "token"},  # the CLS token after the final norm
    # final norm on every token, then the mean of the patches
    "avg": {"global_pool": "avg", "fc_norm": False},
}



# ---- preprocessing and config.json ---------------------------------------------------------------------


def eval_data_config(img_size: int) -> dict:
    """timm's data-config fields for Stage 3's evaluation transform at ``img_size``, read off the
    transform."""
    steps = resize_eval(img_size).transforms
    resize = next(t for t in steps if isinstance(t, v2.Resize))
    norm = next(t for t in steps if isinstance(t, v2.Normalize))
    if any(isinstance(t, v2.CenterCrop) for t in steps) or tuple(resize.size) != (img_size, img_size):
        raise NotImplementedError("the evaluation transform is no longer a square "
                                  "resize; map it to timm anew")
    return {
        "input_size": [3, img_size, img_size],
        "interpolation": InterpolationMode(resize.interpolation).value,  # "bilinear" (a str or the enum)
        "mean": list(norm.mean),
        "std": list(norm.std),
        "crop_pct": 1.0,  # no crop after the resize
        "crop_mode": "squash",  # resize both sides to the target, aspect not kept
    }


def timm_config(encoder: ViTEncoder) -> dict:
    """``config.json`` for ``timm.create_model("local-dir:…", pretrained=True)`` (timm's Hub layout)."""
    cfg = encoder.cfg
    pool = TIMM_POOLS[encoder.pool]
    model_args = {**cfg.timm_kwargs(), "num_classes": 0, **pool}
    return {
        "architecture": cfg.timm_model,
        "num_classes": 0,
        "num_features": cfg.embed_dim,
        "global_pool": pool["global_pool"],
        "model_args": model_args,
        "pretrained_cfg": {
            **eval_data_config(cfg.img_size),
            "fixed_input_size": True,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "other",
        },
    }


# ---- checks ------------------------------------------------------------------------------------------------


def _parity_input(encoder: ViTEncoder, batch: int = 2) -> torch.Tensor:
    size = encoder.cfg.img_size
    return torch.randn(batch, encoder.cfg.in_chans, size, size, generator=torch.Generator().manual_seed(0))


def timm_folder_parity(folder: Path, encoder: ViTEncoder) -> float:
    """Largest |timm − pacx| feature difference of the folder loaded by timm from ``local-dir:``."""
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = _parity_input(encoder)
    with torch.no_grad():
        return (model(x) - encoder(x)).abs().max().item()


# ---- exports -----------------------------------------------------------------------------------------------


def export_encoder(src: str | Path, out: str | Path, which: str = "last",
                   allow_debug: bool | None = None) -> Path:
    """Write the encoder of ``src`` (any format :func:`~pacx.weights.formats.read_encoder_weights` reads) to
    the safetensors file ``out`` with pacx + timm metadata (:func:`~pacx.weights.formats.export_metadata`).

    The tensors are checked against the architecture by loading them. A Stage 2 run's admissions record is
    copied beside the export as ``<stem>.stage2_admissions.npz`` and named, with its hash, in the metadata
    (:func:`pacx.data.leakage.export_admissions`). A debug run is refused unless ``allow_debug``."""
    return _export_encoder(src, out, which, allow_debug)[1]


def _export_encoder(src: str | Path, out: str | Path, which: str,
                    allow_debug: bool | None) -> tuple[EncoderWeights, Path]:
    """:func:`export_encoder`, also returning what was read."""
    weights = read_encoder_weights(src, which, allow_debug)
    encoder = build_encoder(weights)  # validates the tensors against the architecture
    meta = export_metadata(weights, encoder.cfg)
    if encoder.cfg.norm_eps != TIMM_NORM_EPS:
        log.warning("%s: LayerNorm eps %g; timm builds its ViT with %g, so timm's features will differ "
                    "slightly from pacx.load_encoder's", src, encoder.cfg.norm_eps, TIMM_NORM_EPS)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta.update(export_admissions(src, out))  # a Stage 2 run's admissions travel beside the export
    write_export(encoder.state_dict(), meta, out)
    log.info("exported %s encoder of %s to %s", weights.stage, weights.source, out)
    return weights, out


def _encoder_and_meta(src: str | Path, tmp: Path, which: str, allow_debug: bool | None,
                      pool: str) -> tuple[ViTEncoder, dict[str, str], Path, str]:
    """Export ``src`` to ``tmp`` with :func:`export_encoder` (the one place export metadata is made); also
    returns the path of the file the weights were read from."""
    if pool not in TIMM_POOLS:
        raise KeyError(f"unknown pool {pool!r}; known: {sorted(TIMM_POOLS)}")
    weights, single = _export_encoder(src, tmp / TIMM_WEIGHTS, which=which, allow_debug=allow_debug)
    with safe_open(str(single), "pt") as f:
        meta = dict(f.metadata())
    encoder = load_encoder(single, allow_debug=True).set_pool(pool)  # the debug check ran in export_encoder
    return encoder, meta, single, weights.source


def export_timm_folder(src: str | Path, out_dir: str | Path, which: str = "last",
                       allow_debug: bool | None = None, pool: str = "cls") -> Path:
    """Write ``out_dir/{config.json, model.safetensors, README.md}`` (see the module docstring).

    The folder is written as one unit: built and checked in a temporary folder beside it, then renamed into
    place, so a crash leaves either no folder or the previous one, never a mix. A previous export there is
    replaced; a folder holding anything else is refused (its files are never deleted)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; --format timm writes a folder")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in TIMM_FOLDER_FILES)
        if foreign:
            raise FileExistsError(f"{out_dir} holds files that are not part of a timm folder export "
                                  f"({', '.join(foreign)}); export into a new or empty folder")
    target = out_dir.resolve() if out_dir.is_symlink() else out_dir  # a link to a folder: replace its target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = target.with_name(f".{target.name}.tmp{os.getpid()}")  # two writers never share it
    shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a crashed export of this process id
    tmp_dir.mkdir()  # the mode a plain mkdir of out_dir would get
    try:
        _write_timm_folder(src, tmp_dir, out_dir, which, allow_debug, pool)
        _replace_folder(tmp_dir, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _write_timm_folder(src: str | Path, folder: Path, out_dir: Path, which: str, allow_debug: bool | None,
                       pool: str) -> None:
    """Write the three files into the empty ``folder``, which becomes ``out_dir`` (named by the card)."""
    with tempfile.TemporaryDirectory() as tmp:
        encoder, meta, single, source = _encoder_and_meta(src, Path(tmp), which, allow_debug, pool)
        meta.pop("stage2_admissions", None)  # the id file stays behind (module docstring); its hash is kept
        save_file(load_file(str(single)), str(folder / TIMM_WEIGHTS), metadata=meta)
    _readable_as_umask_allows(folder / TIMM_WEIGHTS)  # safetensors writes 0600; the folder is for sharing
    config = timm_config(encoder)
    (folder / TIMM_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    parity = timm_folder_parity(folder, encoder)
    if encoder.cfg.norm_eps == TIMM_NORM_EPS and parity > PARITY_ATOL:
        raise RuntimeError(f"{out_dir}: timm's features differ from pacx's by {parity:.2e} (> "
                           f"{PARITY_ATOL:g}); nothing was written")
    if encoder.cfg.norm_eps != TIMM_NORM_EPS:
        log.warning("%s: LayerNorm eps %g, timm builds %g: timm's features differ from pacx's by up to %.2e",
                    src, encoder.cfg.norm_eps, TIMM_NORM_EPS, parity)
    card = model_card(meta, run_provenance(source, meta), config, parity, out_dir.name)
    (folder / MODEL_CARD).write_text(card)
    log.info("wrote timm folder %s (%s, pool %s; timm vs pacx %.1e)", out_dir, config["architecture"], pool,
             parity)


def _replace_folder(new: Path, out_dir: Path) -> None:
    """Rename the finished folder ``new`` to ``out_dir``; a previous ``out_dir`` is first moved aside, then
    deleted (a crash in between leaves no folder under the name, never a mix of both)."""
    old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.is_dir():
        out_dir.rename(old)
    new.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _readable_as_umask_allows(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def require_serve():
    """``(onnx, onnxruntime)``, or an ImportError that names the extra to install."""
    try:
        import onnx  # optional dependency (the `serve` extra)
        import onnxruntime  # optional dependency (the `serve` extra)
    except ImportError as err:
        raise ImportError(f"ONNX export needs onnx and onnxruntime ({err.name} is missing): "
                          "pip install 'pacx[serve]'") from err
    return onnx, onnxruntime


def encoder_to_onnx(encoder: ViTEncoder, out: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``encoder`` (eval mode, its current pool) as ONNX with a dynamic batch axis; checked with
    ``onnx.checker`` and against PyTorch with ONNX Runtime (batch 1 and 3). Returns ``out``."""
    onnx, ort = require_serve()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    encoder = encoder.eval()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # two writers never share it
    try:
        with warnings.catch_warnings():
            # TracerWarning: timm's PatchEmbed asserts the input size, which the graph fixes anyway. The
            # exporter's deprecation notice: this exporter is chosen on purpose (module docstring).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings(
                "ignore", message=".*(legacy TorchScript-based ONNX export|feature will be removed).*")
            torch.onnx.export(encoder, (_parity_input(encoder),), str(tmp), input_names=[ONNX_INPUT],
                              output_names=[ONNX_OUTPUT], opset_version=ONNX_OPSET, dynamo=False,
                              dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}})
        model = onnx.load(str(tmp))
        props = {**(metadata or {}), **onnx_preprocessing(encoder)}
        onnx.helper.set_model_props(model, {k: str(v) for k, v in props.items()})
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        for batch in (1, 3):
            x = _parity_input(encoder, batch)
            with torch.no_grad():
                got = torch.from_numpy(session.run(None, {ONNX_INPUT: x.numpy()})[0])
                diff = (got - encoder(x)).abs().max().item()
            if diff > PARITY_ATOL:
                raise RuntimeError(f"{out}: ONNX Runtime differs from PyTorch by {diff:.2e} at batch {batch}")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)  # a failed export leaves nothing
    return out


def onnx_preprocessing(encoder: ViTEncoder) -> dict[str, str]:
    """The ONNX file's own description of its input and feature (``metadata_props``)."""
    data = eval_data_config(encoder.cfg.img_size)
    return {"input": f"{ONNX_INPUT}: float32 [batch, 3, {encoder.cfg.img_size}, {encoder.cfg.img_size}]",
            "output": f"{ONNX_OUTPUT}: float32 [batch, {encoder.embed_dim}]", "pool": encoder.pool,
            "img_size": str(encoder.cfg.img_size), "interpolation": data["interpolation"],
            "mean": json.dumps(data["mean"]), "std": json.dumps(data["std"]), "crop_mode": data["crop_mode"]}


def export_onnx(src: str | Path, out: str | Path, which: str = "last", allow_debug: bool | None = None,
                pool: str = "cls") -> Path:
    """Write the encoder of ``src`` to ``out`` (a ``.onnx`` path) with the export metadata."""
    require_serve()  # before any work
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"{out}: --format onnx writes one file; name it <something>.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        encoder, meta, _, _ = _encoder_and_meta(src, Path(tmp), which, allow_debug, pool)
    meta.pop("stage2_admissions", None)  # as in the timm folder: no id file travels with it
    encoder_to_onnx(encoder, out, meta)
    log.info("wrote ONNX %s (opset %d, pool %s, dynamic batch)", out, ONNX_OPSET, pool)
    return out


def _export_safetensors(src, out, which="last", allow_debug=None, pool="cls") -> Path:
    return export_encoder(src, out, which=which, allow_debug=allow_debug)  # pool is not part of the weights


# --format -> writer(src, out, which, allow_debug, pool)
EXPORT_FORMATS: dict[str, Callable[..., Path]] = {
    "safetensors": _export_safetensors,
    "timm": export_timm_folder,
    "onnx": export_onnx,
}

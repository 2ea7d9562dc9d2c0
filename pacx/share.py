"""Share and serve an encoder: a timm model folder (for the Hugging Face Hub) and an ONNX file.

Both start from anything :func:`pacx.encoders.read_encoder_weights` accepts (a run directory, a checkpoint,
an export, a third-party file) and carry the metadata of :func:`pacx.encoders.export_encoder` (stage,
source file name and SHA-256, git commit; never an absolute path).

**timm folder** (:func:`export_timm_folder`): ``config.json`` in timm's Hub layout, ``model.safetensors``
(timm keys, with the pacx export metadata, so ``pacx.load_encoder`` reads it too) and a ``README.md`` model
card. ``timm.create_model("local-dir:FOLDER", pretrained=True)`` (timm >= 1.0) reads ``config.json``:
``architecture`` names the timm entry point, ``model_args`` are its keyword arguments (they rebuild the exact
architecture: size, depth, heads, and the pooling, see :data:`TIMM_POOLS`), ``pretrained_cfg`` holds the
preprocessing timm's ``resolve_data_config`` returns. The preprocessing is read off Stage 3's evaluation
transform (:func:`pacx.data.transforms.resize_eval`: a square resize without keeping the aspect, bilinear,
ImageNet mean/std), which in timm's terms is ``crop_pct 1.0`` with ``crop_mode "squash"``. The export
checks that timm's features equal pacx's. timm builds every LayerNorm with eps 1e-6 and ``config.json``
cannot name another; an encoder trained with another eps (the authors' Stage 2, 1e-5) is exported with a
warning, and its card states the measured difference.

The folder leaves out a Stage 2 run's ``stage2_admissions.npz``: it lists MIMIC admission ids, which the
PhysioNet data use agreement covers (docs/datasets.md#leakage). ``model.safetensors`` keeps the ids' hash,
so Stage 3 with this folder's weights reports the overlap check as unchecked.

**ONNX** (:func:`export_onnx`): one ``.onnx`` file, input ``pixel_values`` float32 [B, 3, H, W] (ImageNet-
normalised), output ``features`` [B, D], the batch axis dynamic; the export metadata and preprocessing go in
the model's ``metadata_props``. Exported with PyTorch's TorchScript exporter (``dynamo=False``, opset 17,
which has a native LayerNormalization): the torch.export-based exporter needs ``onnxscript`` as a further
dependency, is about 2.5x slower to export a ViT-B and writes the weights to a second ``.onnx.data`` file,
while the TorchScript graph is one self-contained file (a ViT-L is 1.2 GB, within protobuf's 2 GB) that
ONNX Runtime runs as fast. The file is checked with ``onnx.checker`` and its ONNX Runtime output compared
with PyTorch's. ``onnx`` and ``onnxruntime`` are the optional ``serve`` extra (``pip install 'pacx[serve]'``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from torchvision.transforms import InterpolationMode, v2

from pacx.constants import STAGE_MAE, STAGE_PACX
from pacx.data.transforms import resize_eval
from pacx.encoders import MODEL_FOLDER_WEIGHTS, export_encoder, load_encoder
from pacx.models.vit import ViTEncoder
from pacx.run_record import RUN_JSON, read_run_record
from pacx.utils import file_sha256

log = logging.getLogger(__name__)

TIMM_WEIGHTS = MODEL_FOLDER_WEIGHTS
TIMM_CONFIG = "config.json"
MODEL_CARD = "README.md"
ONNX_OPSET = 17
ONNX_INPUT, ONNX_OUTPUT = "pixel_values", "features"
PARITY_ATOL = 1e-4  # timm / ONNX Runtime vs pacx features, float32 on CPU (measured: about 1e-6)
TIMM_NORM_EPS = 1e-6  # the LayerNorm eps of every timm ViT

# pacx pool (pacx.models.vit.POOLS) -> the timm VisionTransformer arguments that compute the same feature.
TIMM_POOLS: dict[str, dict] = {
    "cls": {"global_pool": "token"},  # the CLS token after the final norm
    "avg": {"global_pool": "avg", "fc_norm": False},  # final norm on every token, then the mean of the patches
}

# What the weights of each stage were trained on (the model card; they inherit these terms).
TRAINING_DATA: dict[str, str] = {
    STAGE_MAE: "CheXpert (Stanford; CheXpert Dataset Research Use Agreement): MAE pretraining on chest "
    "radiographs (docs/datasets.md#chexpert).",
    STAGE_PACX: "Symile-MIMIC v1.0.0 (PhysioNet, credentialed access; built from MIMIC-IV, MIMIC-IV-ECG and "
    "MIMIC-CXR-JPG under the PhysioNet Credentialed Health Data License): cross-modal distillation from ECG and "
    "laboratory teachers (docs/datasets.md#symile), starting from a Stage 1 encoder pretrained on CheXpert.",
    "mae_release": "ImageNet-1k (the official MAE release weights; CC BY-NC 4.0).",
}
LICENCE_NOTE = (
    "These weights were learned from chest X-ray data released under credentialed or research-use licences "
    "(CheXpert: Stanford's research use agreement; MIMIC-derived data such as Symile-MIMIC: the PhysioNet "
    "Credentialed Health Data License and data use agreement). The weights inherit the terms of the data they "
    "were trained on: share them only as those terms allow (for example in a private or gated repository whose "
    "users hold the same access), and do not use them to identify individuals."
)


# ---- preprocessing and config.json ---------------------------------------------------------------------


def eval_data_config(img_size: int) -> dict:
    """timm's data-config fields for Stage 3's evaluation transform at ``img_size``, read off the transform."""
    steps = resize_eval(img_size).transforms
    resize = next(t for t in steps if isinstance(t, v2.Resize))
    norm = next(t for t in steps if isinstance(t, v2.Normalize))
    if any(isinstance(t, v2.CenterCrop) for t in steps) or tuple(resize.size) != (img_size, img_size):
        raise NotImplementedError("the evaluation transform is no longer a square resize; map it to timm anew")
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


# ---- what is known about the source ----------------------------------------------------------------------


def find_run_dir(src: str | Path) -> Path | None:
    """The run directory ``src`` is or lies in (the nearest one holding ``run.json``), else None."""
    path = Path(src).resolve()
    return next((p for p in (path, *path.parents) if (p / RUN_JSON).is_file()), None)


def _is_absolute(value: str) -> bool:
    return value.startswith("~") or PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()


def portable_settings(block: Mapping) -> dict:
    """The set scalar (and list-of-scalar) settings of a config block, without absolute paths."""
    out = {}
    for key, value in block.items():
        items = value if isinstance(value, list) else [value]
        if all(v is None or isinstance(v, bool | int | float | str) for v in items) and not any(
            isinstance(v, str) and _is_absolute(v) for v in items
        ):
            out[key] = value
    return {k: v for k, v in out.items() if v is not None}


def run_provenance(src: str | Path) -> dict:
    """What the run behind ``src`` recorded: its config's hash, training commit, steps, data settings."""
    run_dir = find_run_dir(src)
    if run_dir is None:
        return {}
    import yaml

    record = read_run_record(run_dir)
    out = {"run": run_dir.name, "training_git_sha": record.get("git_sha"), "global_step": record.get("global_step"),
           "epoch": record.get("epoch"), "world_size": record.get("world_size"), "status": record.get("status")}
    config = run_dir / "config.yaml"
    if config.is_file():
        out["config_sha256"] = file_sha256(config)
        out["data_settings"] = portable_settings((yaml.safe_load(config.read_text()) or {}).get("data") or {})
    return out


# ---- model card --------------------------------------------------------------------------------------------


def model_card(meta: Mapping[str, str], provenance: Mapping, config: Mapping, parity: float, folder: str) -> str:
    """The folder's ``README.md``: provenance, training data, licence, and how to load and upload it."""
    stage = meta.get("stage", "unknown")
    cfg = json.loads(meta["pacx_vit_config"])
    repo_id = f"my-lab/{folder}"
    pre = config["pretrained_cfg"]
    lines = [
        "---",
        "library_name: timm",
        "license: other",
        "pipeline_tag: image-feature-extraction",
        "tags: [timm, image-feature-extraction, chest-x-ray, pacx]",
        "---",
        "",
        f"# PaCX-MAE encoder ({stage})",
        "",
        f"A ViT encoder for chest X-rays (`{config['architecture']}` layout: {cfg['embed_dim']}-wide, depth "
        f"{cfg['depth']}, {cfg['num_heads']} heads, patch {cfg['patch_size']}, {cfg['img_size']} px), exported by "
        "pacx (PaCX-MAE). `model(x)` returns one "
        f"{cfg['embed_dim']}-dimensional feature per image ({config['global_pool']} pooling: "
        + ("the CLS token after the final LayerNorm" if config["global_pool"] == "token"
           else "the mean of the patch tokens after the final LayerNorm") + ").",
        "",
    ]
    if meta.get("debug"):
        lines += [f"**Debug run** (`{meta['debug']}`): these weights come from a shortened run, not a trained "
                  "model.", ""]
    lines += ["## Provenance", "", "| field | value |", "|---|---|",
              f"| stage | `{stage}` |",
              f"| source | `{meta.get('source')}`" + (f" of run `{meta['source_run']}`" if meta.get("source_run") else "")
              + f" (format `{meta.get('source_format')}`) |",
              f"| source SHA-256 | `{meta.get('source_sha256')}` |",
              f"| exported by pacx commit | `{meta.get('git_sha')}` |"]
    if provenance.get("training_git_sha"):
        lines.append(f"| trained by pacx commit | `{provenance['training_git_sha']}` |")
    if provenance.get("config_sha256"):
        lines.append(f"| run config (`config.yaml`) SHA-256 | `{provenance['config_sha256']}` |")
    for key in ("global_step", "epoch", "world_size", "status"):
        if provenance.get(key) is not None:
            lines.append(f"| {key.replace('_', ' ')} | {provenance[key]} |")
    if meta.get("stage2_admissions_sha256"):
        lines.append(f"| Stage 2 admissions SHA-256 | `{meta['stage2_admissions_sha256']}` (the id file is not "
                     "included: it lists MIMIC admissions) |")
    lines += ["", "## Training data", "", TRAINING_DATA.get(stage, "Not recorded in the source file."), ""]
    if provenance.get("data_settings"):
        settings = ", ".join(f"`{k}={v}`" for k, v in sorted(provenance["data_settings"].items()))
        lines += [f"Data settings of the run: {settings}.", ""]
    lines += ["## Licence", "", LICENCE_NOTE, "",
              "## Preprocessing", "",
              f"RGB, resized to {pre['input_size'][1]} x {pre['input_size'][2]} without keeping the aspect "
              f"({pre['interpolation']}), scaled to [0, 1], normalised with mean {pre['mean']} and std {pre['std']} "
              "(timm: `crop_pct 1.0`, `crop_mode squash`; `timm.data.resolve_data_config` returns it).", "",
              "## Use with timm", "", "```python", "import timm", "import torch", "from PIL import Image", "",
              f'model = timm.create_model("local-dir:{folder}", pretrained=True).eval()   # uploaded: '
              f'"hf-hub:{repo_id}"',
              "data_config = timm.data.resolve_data_config({}, model=model)",
              "transform = timm.data.create_transform(**data_config)   # PIL image -> normalised tensor",
              'image = Image.open("chest_xray.png").convert("RGB")',
              "with torch.no_grad():",
              f"    features = model(transform(image).unsqueeze(0))   # [1, {cfg['embed_dim']}]", "```", "",
              f"timm's features equal pacx's to {parity:.1e} (largest absolute difference on a random batch at "
              "export).", ""]
    if cfg["norm_eps"] != TIMM_NORM_EPS:
        lines += [f"This encoder was trained with LayerNorm eps {cfg['norm_eps']:g}; timm builds eps "
                  f"{TIMM_NORM_EPS:g}, hence that difference. `pacx.load_encoder(\"{TIMM_WEIGHTS}\")` gives the exact "
                  "features.", ""]
    lines += ["## Upload", "", "```python", "from huggingface_hub import create_repo, upload_folder", "",
              f'repo_id = "{repo_id}"   # an organisation or user name you control, then a model name',
              "create_repo(repo_id, private=True, exist_ok=True)   # private or gated: see the licence above",
              f'upload_folder(repo_id=repo_id, folder_path="{folder}")', "```", ""]
    return "\n".join(lines)


# ---- checks ------------------------------------------------------------------------------------------------


def _parity_input(encoder: ViTEncoder, batch: int = 2) -> torch.Tensor:
    size = encoder.cfg.img_size
    return torch.randn(batch, encoder.cfg.in_chans, size, size, generator=torch.Generator().manual_seed(0))


def timm_folder_parity(folder: Path, encoder: ViTEncoder) -> float:
    """Largest |timm − pacx| feature difference of the folder loaded by timm from ``local-dir:``."""
    import timm

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = _parity_input(encoder)
    with torch.no_grad():
        return (model(x) - encoder(x)).abs().max().item()


# ---- exports -----------------------------------------------------------------------------------------------


def _encoder_and_meta(src: str | Path, tmp: Path, which: str, allow_debug: bool | None,
                      pool: str) -> tuple[ViTEncoder, dict[str, str], Path]:
    """Export ``src`` to ``tmp`` with :func:`export_encoder` (the one place export metadata is made)."""
    from safetensors import safe_open

    if pool not in TIMM_POOLS:
        raise KeyError(f"unknown pool {pool!r}; known: {sorted(TIMM_POOLS)}")
    single = export_encoder(src, tmp / TIMM_WEIGHTS, which=which, allow_debug=allow_debug)
    with safe_open(str(single), "pt") as f:
        meta = dict(f.metadata())
    encoder = load_encoder(single, allow_debug=True).set_pool(pool)  # the debug check ran in export_encoder
    return encoder, meta, single


def export_timm_folder(src: str | Path, out_dir: str | Path, which: str = "last", allow_debug: bool | None = None,
                       pool: str = "cls") -> Path:
    """Write ``out_dir/{config.json, model.safetensors, README.md}`` (see the module docstring)."""
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; --format timm writes a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        encoder, meta, single = _encoder_and_meta(src, Path(tmp), which, allow_debug, pool)
        meta.pop("stage2_admissions", None)  # the id file stays behind (module docstring); its hash is kept
        save_file(load_file(str(single)), str(out_dir / TIMM_WEIGHTS), metadata=meta)
    _readable_as_umask_allows(out_dir / TIMM_WEIGHTS)  # safetensors writes 0600; the folder is for sharing
    config = timm_config(encoder)
    (out_dir / TIMM_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    parity = timm_folder_parity(out_dir, encoder)
    if encoder.cfg.norm_eps == TIMM_NORM_EPS and parity > PARITY_ATOL:
        raise RuntimeError(f"{out_dir}: timm's features differ from pacx's by {parity:.2e} (> {PARITY_ATOL:g})")
    if encoder.cfg.norm_eps != TIMM_NORM_EPS:
        log.warning("%s: LayerNorm eps %g, timm builds %g: timm's features differ from pacx's by up to %.2e",
                    src, encoder.cfg.norm_eps, TIMM_NORM_EPS, parity)
    card = model_card(meta, run_provenance(src), config, parity, out_dir.name)
    (out_dir / MODEL_CARD).write_text(card)
    log.info("wrote timm folder %s (%s, pool %s; timm vs pacx %.1e)", out_dir, config["architecture"], pool, parity)
    return out_dir


def _readable_as_umask_allows(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def require_serve():
    """``(onnx, onnxruntime)``, or an ImportError that names the extra to install."""
    try:
        import onnx  # optional dependency (the `serve` extra)
        import onnxruntime
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
    tmp = out.with_name(f".{out.name}.tmp")
    with warnings.catch_warnings():
        # TracerWarning: timm's PatchEmbed asserts the input size, which the graph fixes anyway. The exporter's
        # deprecation notice: this exporter is chosen on purpose (module docstring).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(legacy TorchScript-based ONNX export|feature will be removed).*")
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
            diff = (torch.from_numpy(session.run(None, {ONNX_INPUT: x.numpy()})[0]) - encoder(x)).abs().max().item()
        if diff > PARITY_ATOL:
            tmp.unlink()
            raise RuntimeError(f"{out}: ONNX Runtime differs from PyTorch by {diff:.2e} at batch {batch}")
    tmp.replace(out)
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
        encoder, meta, _ = _encoder_and_meta(src, Path(tmp), which, allow_debug, pool)
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

"""The model card of a shared encoder and what is known about its source run: the ``README.md`` of a timm
model folder (:func:`pacx.share.export_timm_folder`). Licence terms: docs/design.md#sharing."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

import yaml

from pacx.constants import STAGE_MAE, STAGE_PACX
from pacx.data.images import HIGH_BIT_MODES
from pacx.run_record import RUN_JSON, read_run_record
from pacx.utils import file_sha256
from pacx.weights.formats import MODEL_FOLDER_WEIGHTS

TIMM_WEIGHTS = MODEL_FOLDER_WEIGHTS
TIMM_NORM_EPS = 1e-6  # the LayerNorm eps of every timm ViT

# What the weights of each stage were trained on (the model card; they inherit these terms).
TRAINING_DATA: dict[str, str] = {
    STAGE_MAE: "CheXpert (Stanford; CheXpert Dataset Research Use Agreement): MAE pretraining on chest "
    "radiographs (docs/datasets.md#chexpert).",
    STAGE_PACX: "Symile-MIMIC v1.0.0 (PhysioNet, credentialed access; built from MIMIC-IV, MIMIC-IV-ECG and "
    "MIMIC-CXR-JPG under the PhysioNet Credentialed Health Data License): cross-modal distillation from ECG "
    "and laboratory teachers (docs/datasets.md#symile), starting from a Stage 1 encoder pretrained on "
    "CheXpert.",
    "mae_release": "ImageNet-1k (the official MAE release weights; CC BY-NC 4.0).",
}
LICENCE_NOTE = (
    "These weights were learned from chest X-ray data released under credentialed or research-use licences "
    "(CheXpert: Stanford's research use agreement; MIMIC-derived data such as Symile-MIMIC: the PhysioNet "
    "Credentialed Health Data License and data use agreement). The weights inherit the terms of the data "
    "they were trained on: share them only as those terms allow (for example in a private or gated "
    "repository whose users hold the same access), and do not use them to identify individuals."
)


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


def run_provenance(source: str | Path, meta: Mapping[str, str]) -> dict:
    """What the run that made the weights recorded: its name, config's hash and data settings, training
    commit, world size and status; the step and epoch are the weights' own (``meta``, the export metadata).

    ``source`` is the file the weights were read from. A run's record is used only when that run made them:
    a pacx checkpoint (``source_format``) in a run directory of its stage, or a pacx export whose first file
    (``origin_*``) is a checkpoint in the run directory the export lies in, with the recorded hash. A file
    that merely lies in some run's directory (a third-party file, an export of another run) gets none."""
    out = {k: int(meta[k]) for k in ("global_step", "epoch") if meta.get(k)}
    run_dir = _weights_run_dir(Path(source), meta)
    if run_dir is None:
        return out
    record = read_run_record(run_dir)
    out.update({"run": run_dir.name, "training_git_sha": record.get("git_sha"),
                "world_size": record.get("world_size"), "status": record.get("status")})
    config = run_dir / "config.yaml"
    if config.is_file():
        out["config_sha256"] = file_sha256(config)
        out["data_settings"] = portable_settings((yaml.safe_load(config.read_text()) or {}).get("data") or {})
    return out


def _weights_run_dir(source: Path, meta: Mapping[str, str]) -> Path | None:
    """The run directory that made the weights read from ``source`` (:func:`run_provenance`), or None."""
    run_dir = find_run_dir(source)
    if run_dir is None:
        return None
    fmt = meta.get("source_format")
    if fmt == "pacx_checkpoint":
        stage = read_run_record(run_dir).get("stage")
        return run_dir if stage in (None, meta.get("stage")) else None  # not a checkpoint copied in
    if fmt == "pacx_export" and meta.get("origin_source_format") == "pacx_checkpoint":
        ckpt = run_dir / meta.get("origin_source", "")
        if (meta.get("origin_source_run") == run_dir.name and ckpt.is_file()
                and file_sha256(ckpt) == meta.get("origin_source_sha256")):
            return run_dir
    return None


# ---- model card --------------------------------------------------------------------------------------------


def model_card(meta: Mapping[str, str], provenance: Mapping, config: Mapping, parity: float,
               folder: str) -> str:
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
        f"{cfg['depth']}, {cfg['num_heads']} heads, patch {cfg['patch_size']}, {cfg['img_size']} px), "
        f"exported by pacx (PaCX-MAE). `model(x)` returns one {cfg['embed_dim']}-dimensional feature per "
        f"image ({config['global_pool']} pooling: "
        + ("the CLS token after the final LayerNorm" if config["global_pool"] == "token"
           else "the mean of the patch tokens after the final LayerNorm") + ").",
        "",
    ]
    if meta.get("debug"):
        lines += [f"**Debug run** (`{meta['debug']}`): these weights come from a shortened run, "
                  "not a trained model.", ""]
    lines += ["## Provenance", "", "| field | value |", "|---|---|",
              f"| stage | `{stage}` |",
              f"| source | `{meta.get('source')}`"
              + (f" of run `{meta['source_run']}`" if meta.get("source_run") else "")
              + f" (format `{meta.get('source_format')}`) |",
              f"| source SHA-256 | `{meta.get('source_sha256')}` |"]
    if meta.get("origin_source"):  # the source is itself an export
        lines.append(f"| exported from | `{meta['origin_source']}`"
                     + (f" of run `{meta['origin_source_run']}`" if meta.get("origin_source_run") else "")
                     + f" (format `{meta.get('origin_source_format')}`, SHA-256 "
                       f"`{meta.get('origin_source_sha256')}`) |")
    lines.append(f"| exported by pacx commit | `{meta.get('git_sha')}` |")
    if provenance.get("training_git_sha"):
        lines.append(f"| trained by pacx commit | `{provenance['training_git_sha']}` |")
    if provenance.get("config_sha256"):
        lines.append(f"| run config (`config.yaml`) SHA-256 | `{provenance['config_sha256']}` |")
    for key in ("global_step", "epoch", "world_size", "status"):
        if provenance.get(key) is not None:
            lines.append(f"| {key.replace('_', ' ')} | {provenance[key]} |")
    if meta.get("stage2_admissions_sha256"):
        lines.append(f"| Stage 2 admissions SHA-256 | `{meta['stage2_admissions_sha256']}` (the id file is "
                     "not included: it lists MIMIC admissions) |")
    lines += ["", "## Training data", "", TRAINING_DATA.get(stage, "Not recorded in the source file."), ""]
    if provenance.get("data_settings"):
        settings = ", ".join(f"`{k}={v}`" for k, v in sorted(provenance["data_settings"].items()))
        lines += [f"Data settings of the run: {settings}.", ""]
    lines += ["## Licence", "", LICENCE_NOTE, "",
              "## Preprocessing", "",
              "Images with more than 8 bits per sample (16-bit PNG or TIFF: PIL modes "
              f"{', '.join(sorted(HIGH_BIT_MODES))}) are first windowed to 8 bits over the image's own "
              "range, `round(255 * (v - min) / (max - min))` (a constant image becomes 0), as pacx decodes "
              "them; PIL's `convert(\"RGB\")` alone would clip them at 255. Then: "
              f"RGB, resized to {pre['input_size'][1]} x {pre['input_size'][2]} without keeping the aspect "
              f"({pre['interpolation']}), scaled to [0, 1], normalised with mean {pre['mean']} and std "
              f"{pre['std']} (timm: `crop_pct 1.0`, `crop_mode squash`; `timm.data.resolve_data_config` "
              "returns it).", "",
              "## Use with timm", "", "```python", "import numpy as np", "import timm", "import torch",
              "from PIL import Image", "",
              f'model = timm.create_model("local-dir:{folder}", pretrained=True).eval()   # uploaded: '
              f'"hf-hub:{repo_id}"',
              "data_config = timm.data.resolve_data_config({}, model=model)",
              "transform = timm.data.create_transform(**data_config)   # PIL image -> normalised tensor",
              'image = Image.open("chest_xray.png")',
              f"if image.mode in {tuple(sorted(HIGH_BIT_MODES))!r}:   # > 8 bits: window to its own range",
              "    v = np.asarray(image, dtype=np.float64)",
              "    scale = 255.0 / (v.max() - v.min()) if v.max() > v.min() else 0.0",
              "    image = Image.fromarray(np.rint((v - v.min()) * scale).astype(np.uint8))",
              'image = image.convert("RGB")',
              "with torch.no_grad():",
              f"    features = model(transform(image).unsqueeze(0))   # [1, {cfg['embed_dim']}]", "```", "",
              f"timm's features equal pacx's to {parity:.1e} (largest absolute difference on a random batch "
              "at export).", ""]
    if cfg["norm_eps"] != TIMM_NORM_EPS:
        lines += [f"This encoder was trained with LayerNorm eps {cfg['norm_eps']:g}; timm builds eps "
                  f"{TIMM_NORM_EPS:g}, hence that difference. `pacx.load_encoder(\"{TIMM_WEIGHTS}\")` gives "
                  "the exact features.", ""]
    lines += ["## Upload", "", "```python", "from huggingface_hub import create_repo, upload_folder", "",
              f'repo_id = "{repo_id}"   # an organisation or user name you control, then a model name',
              "create_repo(repo_id, private=True, exist_ok=True)   # private or gated: see the licence above",
              f'upload_folder(repo_id=repo_id, folder_path="{folder}")', "```", ""]
    return "\n".join(lines)

"""Attention rollout heatmaps for ViT encoders (docs/method.md#stage-3: MAE vs PaCX side by side).

Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020): per block the
heads are fused, the residual is modelled by adding the identity, rows are renormalised and the blocks are
multiplied in order; the CLS row over the patch tokens is the heatmap. Hooks capture the attention without
changing the forward (docs/design.md#rollout). Written for pacx from the paper; no code is adapted.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from pacx.data.images import IMAGE_SUFFIXES, open_image
from pacx.data.manifest import require_paths
from pacx.data.transforms import resize_eval

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Capturing attention probabilities


def attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one timm ``Attention`` for its input ``x`` [B, T, D] -> [B, heads, T, T].

    Mirrors timm's non-fused branch (before attention dropout, which is inactive in eval mode).
    """
    b, t, _ = x.shape
    head_dim = getattr(attn, "head_dim", attn.qkv.out_features // (3 * attn.num_heads))
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4)  # [3, B, h, T, d]
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scores = (q * attn.scale) @ k.transpose(-2, -1)  # [B, h, T, T]
    return scores.softmax(dim=-1)


def _attention_modules(encoder: nn.Module) -> list[nn.Module]:
    blocks = getattr(encoder, "blocks", None)
    if blocks is None or not all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks):
        raise TypeError(f"{type(encoder).__name__} has no timm-style `blocks[i].attn.qkv`; cannot "
                        "capture attention")
    return [blk.attn for blk in blocks]


@contextmanager
def capture_attention(encoder: nn.Module) -> Iterator[list[torch.Tensor | None]]:
    """Within the context, every forward of ``encoder`` fills the yielded list (one entry per block)
    with that block's attention probabilities [B, heads, T, T]. Hooks are removed on exit."""
    modules = _attention_modules(encoder)
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def make_hook(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
                raise NotImplementedError("attention capture supports unmasked, non-causal attention only")
            x = args[0] if args else kwargs["x"]
            with torch.no_grad():
                captured[i] = attention_probs(module, x).detach()

        return hook

    handles = [m.register_forward_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def attention_maps(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Run ``encoder(x)`` once and return each block's attention probabilities [B, heads, T, T], in order."""
    with capture_attention(encoder) as captured:
        encoder(x)
    if any(a is None for a in captured):
        raise RuntimeError("some attention blocks did not run during the forward pass")
    return list(captured)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Rollout

# Head fusion: [B, heads, T, T] -> [B, T, T].
HEAD_FUSIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda a: a.mean(dim=1),
    "max": lambda a: a.amax(dim=1),
    "min": lambda a: a.amin(dim=1),
}


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """[B, heads, T, T] -> [B, T, T] with a named fusion from :data:`HEAD_FUSIONS`."""
    if head_fusion not in HEAD_FUSIONS:
        raise KeyError(f"unknown head fusion {head_fusion!r}; known: {sorted(HEAD_FUSIONS)}")
    return HEAD_FUSIONS[head_fusion](attention)


def discard_lowest(attention: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """Zero the lowest ``discard_ratio`` fraction of each sample's entries outside the CLS column.

    ``attention``: [B, T, T]. Column 0 (attention *to* CLS) is always kept, so every row keeps mass.
    The fraction is taken over all rows of a sample together (as in the common rollout practice).
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    b, t, _ = attention.shape
    rest = attention[:, :, 1:].reshape(b, -1)  # [B, T*(T-1)]
    k = int(rest.shape[1] * discard_ratio)
    if k == 0:
        return attention
    idx = rest.topk(k, dim=1, largest=False).indices  # [B, k]
    rest = rest.scatter(1, idx, 0.0)
    return torch.cat([attention[:, :, :1], rest.reshape(b, t, t - 1)], dim=2)


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: bool = True,
) -> torch.Tensor:
    """Abnar & Zuidema rollout of per-block attentions [B, heads, T, T] -> [B, T, T].

    Per block: fuse heads, optionally discard the weakest entries, add the identity (the residual
    stream) if ``residual``, renormalise rows; then ``R = Â_L · … · Â_1``. Row i of ``R`` is how much
    of token i's final representation comes from each input token.
    """
    if not attentions:
        raise ValueError("attention_rollout needs at least one attention map")
    result: torch.Tensor | None = None
    for attention in attentions:
        a = fuse_heads(attention.float(), head_fusion)  # [B, T, T]
        a = discard_lowest(a, discard_ratio)
        if residual:
            a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        result = a if result is None else a @ result
    return result


def cls_heatmap(rollout: torch.Tensor, grid: int) -> torch.Tensor:
    """CLS row of ``rollout`` [B, T, T] over the patch tokens -> [B, grid, grid], min-max scaled to [0, 1]."""
    b, t, _ = rollout.shape
    if t - 1 != grid * grid:
        raise ValueError(f"{t} tokens do not hold a CLS token plus a {grid}x{grid} patch grid")
    heat = rollout[:, 0, 1:].reshape(b, grid, grid).float()
    lo = heat.amin(dim=(1, 2), keepdim=True)
    span = heat.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 0, (heat - lo) / span.clamp_min(1e-12), torch.zeros_like(heat))


def rollout_heatmaps(
    encoder: nn.Module,
    x: torch.Tensor,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    batch_size: int = 8,
) -> torch.Tensor:
    """Images [N, 3, H, W] -> CLS rollout heatmaps [N, g, g] in [0, 1], in batches of ``batch_size``."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        attns = attention_maps(encoder, x[start : start + batch_size])
        roll = attention_rollout(attns, head_fusion, discard_ratio)  # [b, T, T]
        out.append(cls_heatmap(roll, math.isqrt(roll.shape[-1] - 1)))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# Rendering


def _to_numpy(a: torch.Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def overlay(
    image: np.ndarray | torch.Tensor,
    heatmap: np.ndarray | torch.Tensor,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> np.ndarray:
    """Grayscale uint8 image [H, W] + heatmap [g, g] in [0, 1] -> uint8 RGB [H, W, 3].

    The heatmap is upsampled bilinearly to the image size, coloured with a matplotlib colormap and
    alpha-blended over the (gray) image: ``(1 - alpha) · image + alpha · colour``.
    """
    img = _to_numpy(image)
    if img.ndim != 2:
        raise ValueError(f"overlay expects a grayscale [H, W] image, got shape {img.shape}")
    h, w = img.shape
    heat = torch.as_tensor(_to_numpy(heatmap), dtype=torch.float32)[None, None]  # [1, 1, g, g]
    heat = F.interpolate(heat, size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()
    colour = colormaps[cmap](heat)[..., :3]  # [H, W, 3] in [0, 1]
    gray = np.repeat(img.astype(np.float32)[..., None] / 255.0, 3, axis=2)  # [H, W, 3]
    blend = (1.0 - alpha) * gray + alpha * colour
    return np.clip(np.rint(blend * 255.0), 0, 255).astype(np.uint8)


def render_grid(
    images: Sequence[np.ndarray],
    columns: Mapping[str, np.ndarray | torch.Tensor],
    out_png: str | Path,
    alpha: float = 0.5,
    cmap: str = "jet",
    row_labels: Sequence[str] | None = None,
    panel_inches: float = 2.5,
    dpi: int = 100,
) -> Path:
    """One row per image: original | one overlay per backbone (titled by name); written atomically.

    ``images``: N grayscale uint8 arrays [H, W] (sizes may differ); ``columns``: name -> heatmaps
    [N, g, g]. Rendered with matplotlib's Agg canvas (no pyplot state).
    """
    n = len(images)
    if n == 0:
        raise ValueError("render_grid needs at least one image")
    for name, maps in columns.items():
        if len(maps) != n:
            raise ValueError(f"column {name!r} holds {len(maps)} heatmaps for {n} images")
    ncols = 1 + len(columns)
    aspect = max(img.shape[0] / img.shape[1] for img in images)  # height / width of the tallest panel
    fig = Figure(figsize=(ncols * panel_inches, n * panel_inches * aspect + 0.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, ncols, squeeze=False)
    titles = ["image", *columns]
    for r, img in enumerate(images):
        panels = [np.repeat(img[..., None], 3, axis=2)]
        panels += [overlay(img, _to_numpy(maps[r]), alpha, cmap) for maps in columns.values()]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
        if row_labels is not None:
            axes[r, 0].set_ylabel(row_labels[r], fontsize=7)
    fig.tight_layout(pad=0.3)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out_png)
    return out_png


def save_heatmaps_npz(path: str | Path, columns: Mapping[str, np.ndarray | torch.Tensor]) -> Path:
    """Write ``{name: [N, g, g] float32}`` to ``path`` (.npz) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **{name: _to_numpy(maps).astype(np.float32) for name, maps in columns.items()})
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------
# Inputs


def collect_image_paths(
    sources: Sequence[str | Path], path_column: str = "Path", image_root: str | Path | None = None
) -> list[Path]:
    """Expand files, directories (their images by :data:`pacx.data.images.IMAGE_SUFFIXES`, sorted; not
    recursive) and CSV manifests into image paths.

    Relative CSV paths resolve against ``image_root`` if given, else the CSV's folder. A blank path cell is an
    error naming the CSV and its row.
    """
    paths: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            paths += sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif src.suffix.lower() == ".csv":
            frame = pd.read_csv(src)
            if path_column not in frame.columns:
                raise KeyError(f"{src}: no column {path_column!r} (columns: {list(frame.columns)})")
            require_paths(frame, path_column, str(src))  # a blank cell is not the path "nan"
            root = Path(image_root) if image_root is not None else src.parent
            paths += [p if p.is_absolute() else root / p for p in map(Path, frame[path_column].astype(str))]
        elif src.exists():
            paths.append(src)
        else:
            raise FileNotFoundError(f"image source not found: {src}")
    return paths


def load_gray(path: str | Path) -> np.ndarray:
    """Read an image file (any bit depth, :func:`pacx.data.images.open_image`) as grayscale uint8 [H, W]; an
    unreadable file is an error naming it."""
    try:
        return np.asarray(open_image(path, "L"), dtype=np.uint8)
    except (OSError, ValueError) as err:  # ImageDecodeError is a ValueError
        raise ValueError(f"cannot read image {path}: {err}") from err


def model_inputs(images: Sequence[np.ndarray], img_size: int) -> torch.Tensor:
    """Grayscale uint8 images -> [N, 3, img_size, img_size] with the evaluation transform (3 channels)."""
    transform = resize_eval(img_size)
    return torch.stack([transform(Image.fromarray(img).convert("RGB")) for img in images])


def resize_longest(image: np.ndarray, size: int) -> np.ndarray:
    """Grayscale uint8 [H, W] -> the same image with its longest side ``size`` (aspect kept), for display."""
    h, w = image.shape
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL: (width, height)
    return np.asarray(Image.fromarray(image).resize(new, Image.Resampling.BILINEAR), dtype=np.uint8)

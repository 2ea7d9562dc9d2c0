"""The one image decoder of pacx: any supported file -> an 8-bit PIL image in ``L`` or ``RGB``.

Every loader goes through :func:`open_image`, so a file decodes to the same pixels whichever path reads it.
Modes with more than 8 bits per sample are windowed to the image's own range; any other unsupported mode (and
DICOM) is an :class:`ImageDecodeError` naming the file and the mode. The rule:
docs/datasets.md#image-decoding; the full mode lists and why: docs/design.md#image-decoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Bumped whenever decoding changes the pixels of some file (caches keyed on images record it).
DECODER_VERSION = 2

EIGHT_BIT_MODES = frozenset({"1", "L", "P", "RGB", "CMYK", "YCbCr", "LA", "PA", "RGBA", "RGBa", "RGBX"})
HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
OutputMode = Literal["L", "RGB"]


class ImageDecodeError(ValueError):
    """An image file cannot be decoded into pacx's pixel range; the message names the file and why."""


def window_to_uint8(values: np.ndarray) -> np.ndarray:
    """Samples of any numeric dtype -> uint8 by min–max windowing over the array (constant -> 0)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("non-finite sample values")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_8bit(img: Image.Image, mode: OutputMode = "RGB", source: str | Path = "<image>") -> Image.Image:
    """An opened PIL image -> a loaded 8-bit image in ``mode`` (the rules in the module docstring)."""
    if mode not in ("L", "RGB"):
        raise ValueError(f"output mode must be 'L' or 'RGB', not {mode!r}")
    if img.mode in EIGHT_BIT_MODES:
        return img.convert(mode)
    if img.mode in HIGH_BIT_MODES:
        try:
            gray = Image.fromarray(window_to_uint8(np.asarray(img)), mode="L")
        except ValueError as err:
            raise ImageDecodeError(f"{source}: cannot window {img.mode} image: {err}") from err
        return gray.convert(mode)
    supported = ", ".join(sorted(EIGHT_BIT_MODES | HIGH_BIT_MODES))
    raise ImageDecodeError(f"{source}: unsupported image mode {img.mode!r} (supported: {supported})")


def open_image(path: str | Path, mode: OutputMode = "RGB") -> Image.Image:
    """Decode ``path`` (PNG, JPEG, TIFF, … any bit depth above) into an 8-bit ``L`` or ``RGB`` image.

    A missing, unreadable, unsupported or oversized (PIL's decompression-bomb limit) file raises
    (``FileNotFoundError``, :class:`ImageDecodeError`, both naming the file)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return to_8bit(img, mode, path)
    except (FileNotFoundError, ImageDecodeError):
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{path}: cannot decode image: {err}") from err


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")  # what folder inputs pick up (any case)


def find_images(folder: str | Path) -> list[str]:
    """The image files under ``folder`` (recursive, :data:`IMAGE_SUFFIXES`), as sorted relative POSIX paths;
    none is an error naming the folder."""
    folder = Path(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no {' '.join(IMAGE_SUFFIXES)} images under {folder}")
    return paths

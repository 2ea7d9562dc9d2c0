"""pacx.data.images: one bit-depth-aware decoder, used by every loader and the image cache.

An 8-bit grey X-ray that spans 0-255 and its 16-bit copy (value × 257) must give the same pixels (to one grey
level) through the manifest dataset, the segmentation dataset (image and mask), the decoded-image cache and
attention rollout's reader; every supported mode lands in the same range; an unsupported mode is an error
naming the file and the mode.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pacx.data.cache import CachedImageDataset, ImageCache, build_image_cache
from pacx.data.images import ImageDecodeError, open_image, to_8bit, window_to_uint8
from pacx.data.manifest import ImageManifestDataset, ManifestError
from pacx.data.seg_dataset import SegmentationDataset
from pacx.data.transforms import resize_eval
from pacx.eval.rollout import load_gray

H, W = 24, 20


def _gray8() -> np.ndarray:
    """A grey image that spans the full 8-bit range (0 and 255 both present)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(H, W), dtype=np.uint8)
    img[0, 0], img[-1, -1] = 0, 255
    return img


def _save_16bit(arr8: np.ndarray, path, mode: str = "I;16") -> None:
    """``arr8`` rescaled to 16 bits (× 257: 0 → 0, 255 → 65535) and saved in ``mode``."""
    arr16 = arr8.astype(np.uint16) * 257
    if mode == "I;16B":
        Image.frombytes("I;16B", (W, H), arr16.astype(">u2").tobytes()).save(path)
    elif mode == "I":
        Image.fromarray(arr16.astype(np.int32)).save(path)  # 32-bit TIFF
    else:
        Image.fromarray(arr16).save(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An 8-bit PNG and 16-bit copies (PNG I;16, TIFF I;16B, TIFF I) of the same image."""
    root = tmp_path_factory.mktemp("bitdepth")
    arr = _gray8()
    Image.fromarray(arr).save(root / "a8.png")
    _save_16bit(arr, root / "a16.png")
    _save_16bit(arr, root / "a16b.tif", "I;16B")
    _save_16bit(arr, root / "a32.tif", "I")
    return root, arr


def test_16bit_files_decode_like_their_8bit_original(pair):
    root, arr = pair
    assert Image.open(root / "a16.png").mode == "I;16" and Image.open(root / "a16b.tif").mode == "I;16B"
    for name in ("a16.png", "a16b.tif", "a32.tif"):
        for mode in ("L", "RGB"):
            got = np.asarray(open_image(root / name, mode), dtype=np.int16)
            want = np.asarray(open_image(root / "a8.png", mode), dtype=np.int16)
            assert np.abs(got - want).max() <= 1, (name, mode)
    assert np.asarray(open_image(root / "a16.png", "L")).mean() < 250  # not the old all-white image


def test_16bit_window_is_the_images_own_range(tmp_path):
    """12-bit data in a 16-bit container (0-4095) is stretched, not left nearly black."""
    arr = (np.linspace(0, 4095, H * W).reshape(H, W)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "x.png")
    out = np.asarray(open_image(tmp_path / "x.png", "L"))
    assert out.min() == 0 and out.max() == 255
    assert (window_to_uint8(np.full((2, 2), 7)) == 0).all()  # constant image -> black


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "I;16", "I", "F"])
def test_every_supported_mode_loads_to_8bit_rgb_and_l(tmp_path, mode):
    img = Image.new(mode, (W, H))
    for out_mode in ("RGB", "L"):
        got = to_8bit(img, out_mode, tmp_path / "in-memory")
        assert got.mode == out_mode and got.size == (W, H)
        x = torch.from_numpy(np.array(got)).float() / 255  # the same [0, 1] range for every source
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


@pytest.mark.bad_input
def test_unsupported_mode_names_file_and_mode(tmp_path):
    """Image in an unsupported mode (e.g. HSV; PIL cannot even write one) → ImageDecodeError naming the file
    and the mode."""
    with pytest.raises(ImageDecodeError, match=r"odd\.png: unsupported image mode 'HSV'"):
        to_8bit(Image.new("HSV", (W, H)), "RGB", tmp_path / "odd.png")


@pytest.mark.bad_input
def test_undecodable_file_names_the_file(tmp_path):
    """A file that is not an image → ImageDecodeError naming the file."""
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError, match=r"junk\.png: cannot decode image"):
        open_image(tmp_path / "junk.png")


def test_manifest_dataset_reads_16bit_like_8bit(pair):
    root, _ = pair
    df = pd.DataFrame({"Path": ["a8.png", "a16.png", "a16b.tif"], "y": [0, 1, 0]})
    ds = ImageManifestDataset(df, root, "Path", ["y"], resize_eval(16), source="m.csv")
    x8, x16, x16b = ds[0][0], ds[1][0], ds[2][0]
    step = 1 / 255 / min(0.229, 0.224, 0.225) + 1e-5  # one grey level after ImageNet normalisation
    assert (x16 - x8).abs().max() <= step and (x16b - x8).abs().max() <= step


def test_segmentation_dataset_reads_16bit_images_and_masks(pair, tmp_path):
    root, arr = pair
    mask = (arr > 127).astype(np.uint8) * 255
    Image.fromarray(mask).save(root / "m8.png")
    _save_16bit(mask, root / "m16.png")
    df = pd.DataFrame({"img_path": ["a8.png", "a16.png"], "mask_path": ["m8.png", "m16.png"]})
    ds = SegmentationDataset(df, root, "img_path", "mask_path", 16, train=False, source="seg.csv")
    (x8, y8), (x16, y16) = ds[0], ds[1]
    step = 1 / 255 / min(0.229, 0.224, 0.225) + 1e-5
    assert (x16 - x8).abs().max() <= step
    assert torch.equal(y8, y16) and 0 < y16.mean() < 1  # the 16-bit mask is a real mask, not all foreground


def test_image_cache_stores_16bit_like_8bit(pair, tmp_path):
    root, _ = pair
    out = build_image_cache(["a8.png", "a16.png", "a16b.tif"], root, tmp_path / "cache", 16, workers=0,
                            progress=False)
    ds = CachedImageDataset(ImageCache(out), ["a8.png", "a16.png", "a16b.tif"])
    a8, a16, a16b = (ds[i][0].int() for i in range(3))
    assert (a16 - a8).abs().max() <= 1 and (a16b - a8).abs().max() <= 1
    assert ds[1][1].tolist() == [W, H]


def test_rollout_reader_reads_16bit_like_8bit(pair):
    root, _ = pair
    assert np.abs(load_gray(root / "a16.png").astype(int) - load_gray(root / "a8.png").astype(int)).max() <= 1


@pytest.mark.bad_input
def test_manifest_with_unsupported_mode_names_row_line_and_path(tmp_path):
    """Manifest row whose image cannot be decoded → ManifestError naming the CSV, row, line and path."""
    Image.fromarray(_gray8()).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    df = pd.DataFrame({"Path": ["ok.png", "bad.png"]})
    ds = ImageManifestDataset(df, tmp_path, "Path", source="list.csv")
    with pytest.raises(ManifestError, match=r"list\.csv: row 1 \(line 3\): cannot read image .*bad\.png"):
        ds[1]


@pytest.mark.bad_input
def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    """Image with more pixels than PIL's decompression-bomb limit → ImageDecodeError naming the file (and
    ``skip_unreadable`` drops it), not PIL's bare DecompressionBombError."""
    Image.fromarray(_gray8()).save(tmp_path / "big.png")
    Image.fromarray(_gray8()[:4, :4]).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W // 4)  # big.png has 4x the limit, small.png less
    with pytest.raises(ImageDecodeError, match=r"big\.png: cannot decode image: .*decompression bomb"):
        open_image(tmp_path / "big.png")
    df = pd.DataFrame({"Path": ["small.png", "big.png"]})
    kept = ImageManifestDataset(df, tmp_path, "Path", source="m.csv", skip_unreadable=True)
    assert kept.paths == ["small.png"]

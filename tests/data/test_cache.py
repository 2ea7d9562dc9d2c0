"""The decoded-image cache (pacx.data.cache) and its batched augmentation
(pacx.data.batched) vs the PIL path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from pacx.constants import IMAGENET_MEAN, IMAGENET_STD
from pacx.data.batched import (
    BATCHED_TRANSFORMS,
    BatchedCropFlip,
    BatchedResize,
    build_batched_transform,
    crop_flip_resize,
    normalize_batch,
    sample_crop_boxes,
    scale_boxes,
)
from pacx.data.cache import CachedImageDataset, CacheError, ImageCache, build_image_cache
from pacx.data.images import DECODER_VERSION
from pacx.data.manifest import ImageManifestDataset
from pacx.data.transforms import TRANSFORMS, build_transform, resize_eval
from pacx.testing.chexpert import write_chexpert_release
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64  # cache side used throughout: small keeps the tests fast
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def to_grey_levels(x: torch.Tensor) -> torch.Tensor:
    """Undo ImageNet normalisation: float [B, 3, H, W] in 0..255 grey levels."""
    return (x * STD + MEAN) * 255


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """CheXpert-like 390x320 JPEGs plus two of other shapes (portrait, noise) appended to the manifest."""
    root = write_chexpert_release(tmp_path_factory.mktemp("chexpert"), n_train=14, n_valid=0, seed=3)
    df = pd.read_csv(root / "train.csv")
    rng = np.random.default_rng(0)
    extra = {"train/odd/portrait.jpg": (150, 230), "train/odd/noise.jpg": (97, 61)}
    for rel, (w, h) in extra.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L").save(root / rel, quality=85)
    extra_rows = pd.DataFrame({"Path": [f"CheXpert-v1.0-small/{r}" for r in extra]})
    df = pd.concat([df, extra_rows], ignore_index=True)
    df["rel"] = df["Path"].str.split("/", n=1).str[1]  # path relative to root, as the PIL path reads it
    return root, df


@pytest.fixture(scope="module")
def cache_dir(release, tmp_path_factory) -> Path:
    root, df = release
    return build_image_cache(df["Path"], root, tmp_path_factory.mktemp("cache") / "c", SIZE,
                             workers=0, chunk=4, strip_components=1, progress=False)


def collate_all(dataset, collate_fn=None):
    return next(iter(DataLoader(dataset, batch_size=len(dataset), shuffle=False, collate_fn=collate_fn)))


# ------------------------------------------------------------------------------------------ (i) pixels


@pytest.mark.parametrize("channels", [1, 3])
def test_eval_collate_matches_pil_resize_eval(release, tmp_path, channels):
    root, df = release
    cache = build_image_cache(df["Path"], root, tmp_path / "c", SIZE, channels=channels, workers=0,
                              strip_components=1, progress=False)
    pil = collate_all(ImageManifestDataset(df, root, "rel", transform=resize_eval(SIZE)))[0]
    ds = CachedImageDataset(ImageCache(cache), df["Path"].tolist())
    cached, labels = collate_all(ds, BatchedResize(SIZE, normalize=True))
    assert cached.shape == pil.shape == (len(df), 3, SIZE, SIZE) and cached.dtype == torch.float32
    assert labels.shape == (len(df), 0)
    # Within one grey level after un-normalising; in fact the same pixels up to float rounding.
    assert (to_grey_levels(cached) - to_grey_levels(pil)).abs().max() < 1e-3


@pytest.mark.parametrize("name", sorted(BATCHED_TRANSFORMS))
def test_batched_transforms_mirror_named_transforms(release, cache_dir, name):
    """Each batched collate has a PIL transform of the same name and yields the same batch layout."""
    root, df = release
    assert name in TRANSFORMS
    kwargs = {"img_size": SIZE} | ({"hflip": 1.0} if name != "resize_eval" else {})
    torch.manual_seed(0)
    pil = collate_all(ImageManifestDataset(df, root, "rel", transform=build_transform(name, **kwargs)))[0]
    ds = CachedImageDataset(cache_dir, df["Path"].tolist())
    cached = collate_all(ds, build_batched_transform(name, normalize=True, **kwargs))[0]
    assert cached.shape == pil.shape and cached.dtype == pil.dtype
    if name != "mae_train":  # deterministic with hflip=1: the same pixels, mirrored alike
        assert (to_grey_levels(cached) - to_grey_levels(pil)).abs().max() < 1e-3


def test_eval_collate_at_other_size_is_close(release, cache_dir):
    root, df = release
    out = 48
    pil = collate_all(ImageManifestDataset(df, root, "rel", transform=resize_eval(out)))[0]
    cached = collate_all(CachedImageDataset(cache_dir, df["Path"].tolist()),
                         BatchedResize(out, normalize=True))[0]
    diff = (to_grey_levels(cached) - to_grey_levels(pil)).abs().mean((1, 2, 3))
    mirrored = (to_grey_levels(cached) - to_grey_levels(pil.flip(-1))).abs().mean()
    # Two resamplings (390 -> 64 -> 48) instead of one: ~1.5 grey levels on the CheXpert-like images
    # (pixel noise included), more on the tiny pure-noise image; a wrong geometry is far off.
    assert diff[:-2].max() < 2.5 and diff.mean() < 0.5 * mirrored


@pytest.mark.bad_input
def test_cache_from_the_old_decoder_must_be_rebuilt(tmp_path, cache_dir):
    """Image cache built before bit-depth-aware decoding (meta.json version 1) → CacheError asking for a
    rebuild."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(cache_dir, old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "decoder"}
                                              | {"version": 1}))
    with pytest.raises(CacheError, match=r"cache version 1 / decoder None.*rebuild it"):
        ImageCache(old)


def test_cache_files_and_item_access(release, cache_dir):
    root, df = release
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta == {"version": 2, "decoder": DECODER_VERSION, "size": SIZE, "channels": 1, "count": len(df),
                    "image_root": str(root.resolve()), "strip_components": 1, "complete": True}
    index = pd.read_csv(cache_dir / "index.csv")
    assert list(index.columns) == ["path", "orig_width", "orig_height"]
    assert index["path"].tolist() == df["Path"].tolist()
    cache = ImageCache(cache_dir)
    arr, (w, h) = cache[len(df) - 2]
    assert arr.dtype == np.uint8 and arr.shape == (1, SIZE, SIZE) and (w, h) == (150, 230)
    with Image.open(root / df["rel"].iat[0]) as img:
        expected = np.asarray(img.convert("L").resize((SIZE, SIZE), Image.BILINEAR))
    np.testing.assert_array_equal(cache[0][0][0], expected)
    img, size, label = CachedImageDataset(cache, df["Path"].tolist(), np.ones((len(df), 2)))[0]
    assert img.dtype == torch.uint8 and size.tolist() == [390, 320] and label.tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------- (ii) resuming


def test_resume_rewrites_undone_rows_identically(release, cache_dir, tmp_path):
    root, df = release
    out = tmp_path / "c"
    build_image_cache(df["Path"], root, out, SIZE, workers=0, strip_components=1, progress=False)
    original = np.load(out / "images.npy").copy()
    np.testing.assert_array_equal(original, np.load(cache_dir / "images.npy"))
    done = np.load(out / "done.npy")
    undone = np.arange(0, len(df), 2)
    done[undone] = False
    np.save(out / "done.npy", done)
    images = np.load(out / "images.npy", mmap_mode="r+")
    images[undone] = 0
    images.flush()
    del images
    build_image_cache(df["Path"], root, out, SIZE, workers=2, chunk=3, strip_components=1, progress=False)
    np.testing.assert_array_equal(np.load(out / "images.npy"), original)
    assert np.load(out / "done.npy").all()
    assert ImageCache(out).count == len(df)


def test_failed_build_is_refused_then_resumes(release, tmp_path):
    root, df = release
    bad = root / df["rel"].iat[5]
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "c"
    try:
        with pytest.raises(CacheError, match=rf"row 5: cannot read image .*{bad.name}"):
            build_image_cache(df["Path"], root, out, SIZE, workers=2, chunk=2, strip_components=1,
                              progress=False)
        assert json.loads((out / "meta.json").read_text())["complete"] is False
        with pytest.raises(CacheError, match=rf"{out}: cache is incomplete"):
            ImageCache(out)
        n_done = int(np.load(out / "done.npy").sum())
        assert n_done < len(df)
    finally:
        bad.write_bytes(good_bytes)
    build_image_cache(df["Path"], root, out, SIZE, workers=0, strip_components=1, progress=False)
    assert ImageCache(out).count == len(df)


def test_rebuild_with_other_settings_is_refused(release, cache_dir):
    root, df = release
    with pytest.raises(CacheError, match="holds a different cache"):
        build_image_cache(df["Path"], root, cache_dir, SIZE + 1, workers=0, strip_components=1)


def test_not_a_cache_names_directory(tmp_path):
    with pytest.raises(CacheError, match=rf"{tmp_path}: not an image cache"):
        ImageCache(tmp_path)


# ------------------------------------------------------------------------------- (iii) lookup, (v) errors


def test_lookup_subset_and_unknown(cache_dir, release):
    _, df = release
    cache = ImageCache(cache_dir)
    subset = df["Path"].iloc[[7, 2, 9]].tolist()
    assert cache.lookup(subset).tolist() == [7, 2, 9]
    with pytest.raises(CacheError, match=r"1 path\(s\) not in the cache.*patient99999/x\.jpg"):
        cache.lookup([subset[0], "CheXpert-v1.0-small/train/patient99999/x.jpg"])


def test_missing_image_names_path_and_row(release, tmp_path):
    root, df = release
    paths = df["Path"].tolist()
    paths[3] = "CheXpert-v1.0-small/train/nowhere/missing.jpg"
    with pytest.raises(CacheError, match=r"row 3: .*nowhere/missing\.jpg"):
        build_image_cache(paths, root, tmp_path / "c", SIZE, workers=0, strip_components=1, progress=False)


def test_duplicate_paths_are_refused(release, tmp_path):
    root, df = release
    with pytest.raises(CacheError, match="duplicated"):
        build_image_cache([df["Path"].iat[0]] * 2, root, tmp_path / "c", SIZE, workers=0, strip_components=1)


# ----------------------------------------------------------------------------------- (iv) batched crop


def ramp_images(b: int = 3, h: int = 40, w: int = 56) -> torch.Tensor:
    """Distinct content per image, uint8 [B, 1, H, W]."""
    g = torch.Generator().manual_seed(0)
    return (torch.rand(b, 1, h, w, generator=g) * 255).to(torch.uint8)


@pytest.mark.parametrize("out", [72, 48])  # upsample and mild downsample
def test_full_box_without_flip_is_plain_resize(out):
    x = ramp_images()
    b, _, h, w = x.shape
    boxes = torch.tensor([[0, 0, h, w]]).repeat(b, 1)
    y = crop_flip_resize(x, boxes, torch.zeros(b, dtype=torch.bool), out)
    ref = F.interpolate(x, size=(out, out), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    flipped = crop_flip_resize(x, boxes, torch.ones(b, dtype=torch.bool), out)
    torch.testing.assert_close(flipped, torch.flip(ref, [-1]), atol=0, rtol=0)


def test_crop_equals_torchvision_resized_crop():
    from torchvision.transforms.v2 import functional as TF

    x = ramp_images()
    boxes = torch.tensor([[3, 5, 30, 40], [0, 0, 40, 56], [10, 2, 20, 30]])
    flip = torch.tensor([True, False, True])
    y = crop_flip_resize(x, boxes, flip, 30)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(x[i], top, left, h, w, [30, 30], antialias=True)
        torch.testing.assert_close(y[i], ref.flip(-1) if flip[i] else ref, atol=0, rtol=0)


def test_boxes_scale_into_the_cache():
    boxes = torch.tensor([[32, 39, 160, 195], [0, 0, 320, 390]])  # original 390 x 320 pixels
    scaled = scale_boxes(boxes, torch.tensor([[390, 320], [390, 320]]), 64)
    assert scaled.tolist() == [[6, 6, 32, 32], [0, 0, 64, 64]]


def test_crop_boxes_follow_random_resized_crop():
    n, (W, H), scale, ratio = 4000, (390, 320), (0.5, 1.0), (3 / 4, 4 / 3)
    wh = torch.tensor([[W, H]]).repeat(n, 1)
    boxes = sample_crop_boxes(wh, scale, ratio, generator=torch.Generator().manual_seed(0)).double()
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    area = h * w / (W * H)
    assert area.min() >= scale[0] - 0.01 and area.max() <= scale[1] + 0.01
    aspect = w / h
    assert aspect.min() >= ratio[0] - 0.01 and aspect.max() <= ratio[1] + 0.01
    # Same law as torchvision: compare moments with its own sampler.
    torch.manual_seed(0)
    rrc = v2.RandomResizedCrop(224, scale=scale, ratio=ratio)
    ref = torch.tensor([[p["top"], p["left"], p["height"], p["width"]] for p in
                        (rrc.make_params([torch.empty(1, H, W)]) for _ in range(n))], dtype=torch.float64)
    ref_area, ref_log_aspect = ref[:, 2] * ref[:, 3] / (W * H), torch.log(ref[:, 3] / ref[:, 2])
    ref_stats = torch.stack([*ref.unbind(1), ref_area, ref_log_aspect], 1)
    stats = torch.stack([top, left, h, w, area, torch.log(aspect)], 1)
    se = torch.sqrt(stats.var(0) / n + ref_stats.var(0) / n)
    assert ((stats.mean(0) - ref_stats.mean(0)).abs() < 4 * se).all()
    assert ((stats.std(0) / ref_stats.std(0) - 1).abs() < 0.1).all()


def test_crop_boxes_fall_back_to_centre_crop():
    boxes = sample_crop_boxes(torch.tensor([[1000, 100], [100, 1000]]), scale=(0.99, 1.0))
    # torchvision: wide image -> h = 100, w = round(100 * 4/3); tall -> w = 100, h = round(100 / (3/4))
    assert boxes.tolist() == [[0, (1000 - 133) // 2, 100, 133], [(1000 - 133) // 2, 0, 133, 100]]


def test_train_collate_output_matches_pil_batches(cache_dir, release):
    _, df = release
    ds = CachedImageDataset(cache_dir, df["Path"].tolist(), torch.arange(len(df) * 2.0).view(-1, 2))
    torch.manual_seed(0)
    images, labels = collate_all(ds, BatchedCropFlip(40, normalize=True))
    assert images.shape == (len(df), 3, 40, 40) and images.dtype == torch.float32
    torch.testing.assert_close(labels, ds.labels)
    grey = to_grey_levels(images)
    torch.testing.assert_close(grey[:, 0], grey[:, 2], atol=1e-3, rtol=0)  # grey expanded to 3 channels
    assert grey.min() > -0.5 and grey.max() < 255.5
    torch.manual_seed(0)
    raw, _ = collate_all(ds, BatchedCropFlip(40, normalize=False))
    assert raw.dtype == torch.uint8 and raw.shape == (len(df), 1, 40, 40)
    torch.testing.assert_close(normalize_batch(raw), images, atol=1e-6, rtol=0)  # same crops, same pixels


def test_collate_in_worker_processes(cache_dir, release):
    _, df = release
    ds = CachedImageDataset(ImageCache(cache_dir), df["Path"].tolist())
    loader = DataLoader(ds, batch_size=4, num_workers=1, collate_fn=build_batched_transform("mae_train",
                                                                                            img_size=32))
    batches = list(loader)
    assert sum(len(x) for x, _ in batches) == len(df)
    assert all(x.shape[1:] == (1, 32, 32) and x.dtype == torch.uint8 for x, _ in batches)


def test_build_script_resumes(release, tmp_path):
    root, df = release
    script = load_script("build_image_cache")
    argv = ["--manifest", str(root / "train.csv"), "--image-root", str(root), "--strip-components", "1",
            "--size", "32", "--out", str(tmp_path / "c"), "--workers", "0", "--no-progress"]
    out = script.main(argv)
    assert ImageCache(out).count == len(pd.read_csv(root / "train.csv"))
    assert script.main(argv) == out  # already complete: a no-op


@pytest.mark.bad_input
def test_build_script_names_the_manifest_row_of_a_blank_path(release, tmp_path):
    """Manifest row with a blank path given to scripts/build_image_cache.py → ManifestError naming the
    manifest, the row and its line (not a lookup of the file "nan")."""
    from pacx.data.manifest import ManifestError

    root, _ = release
    df = pd.read_csv(root / "train.csv")
    df.loc[2, "Path"] = None
    df.to_csv(tmp_path / "m.csv", index=False)
    argv = ["--manifest", str(tmp_path / "m.csv"), "--image-root", str(root), "--strip-components", "1",
            "--size", "32", "--out", str(tmp_path / "c"), "--workers", "0", "--no-progress"]
    with pytest.raises(ManifestError, match=r"m\.csv: 1 row\(s\) with a blank Path .*row 2 \(line 4\)"):
        load_script("build_image_cache").main(argv)


@pytest.mark.bad_input
def test_path_too_short_to_strip_names_the_row(release, tmp_path):
    """Cache path with fewer components than ``strip_components`` → CacheError naming the row and path."""
    root, df = release
    paths = df["Path"].tolist()
    paths[4] = "view1_frontal.jpg"
    with pytest.raises(CacheError,
                       match=r"row 4: cannot strip 1 component\(s\) from path 'view1_frontal\.jpg'"):
        build_image_cache(paths, root, tmp_path / "c", SIZE, workers=0, strip_components=1, progress=False)


# ------------------------------------------------------------------------------- (vi) the cache's source


def test_the_cache_names_the_image_root_it_was_decoded_from(release, cache_dir):
    root, _ = release
    cache = ImageCache(cache_dir)
    assert (cache.image_root, cache.strip_components) == (str(root.resolve()), 1)


def _half_built(release, out: Path) -> None:
    """A cache of the release with every other row not yet decoded (an interrupted build)."""
    root, df = release
    build_image_cache(df["Path"], root, out, SIZE, workers=0, strip_components=1, progress=False)
    done = np.load(out / "done.npy")
    done[::2] = False
    np.save(out / "done.npy", done)


@pytest.mark.bad_input
def test_resume_from_another_image_root_is_refused(release, tmp_path):
    """Resuming an image cache with another image root → CacheError "its rows were decoded from {...}, but
    this build reads {...}".

    CheXpert-v1.0-small and the full-resolution release share the manifest's relative paths, so a resume
    that read the other copy would mix two releases' pixels in one cache."""
    root, df = release
    out = tmp_path / "c"
    _half_built(release, out)
    other = tmp_path / "copy"
    shutil.copytree(root, other)
    decoded_from = rf"{out}: its rows were decoded from .*{root.name}.*, but this build reads .*'{other}'"
    with pytest.raises(CacheError, match=decoded_from):
        build_image_cache(df["Path"], other, out, SIZE, workers=0, strip_components=1, progress=False)
    with pytest.raises(CacheError, match="'strip_components': 1}, but .*'strip_components': 0"):
        build_image_cache(df["Path"], root, out, SIZE, workers=0, strip_components=0, progress=False)
    # a link to the same release is the same files
    (tmp_path / "link").symlink_to(root)
    build_image_cache(df["Path"], tmp_path / "link", out, SIZE, workers=0, strip_components=1, progress=False)
    assert ImageCache(out).count == len(df)


def test_a_cache_without_a_recorded_source_resumes_with_a_warning(release, tmp_path, caplog):
    root, df = release
    out = tmp_path / "c"
    _half_built(release, out)
    meta = json.loads((out / "meta.json").read_text())
    for key in ("image_root", "strip_components"):
        del meta[key]
    (out / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="pacx.data.cache"):
        build_image_cache(df["Path"], root, out, SIZE, workers=0, strip_components=1, progress=False)
    assert "does not record the image root" in caplog.text
    assert json.loads((out / "meta.json").read_text())["image_root"] == str(root.resolve())
    assert ImageCache(out).count == len(df)

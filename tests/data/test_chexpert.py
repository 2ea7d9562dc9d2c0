"""CheXpert: release -> manifests, the prepare CLI, the DataModule, and bad input."""

import logging
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from pacx.data.chexpert import LABELS, META_COLUMNS, CheXpertDataModule, convert_release, convert_split
from pacx.data.manifest import ImageManifestDataset, ManifestError, read_manifest
from pacx.data.transforms import resize_eval


def test_conversion_rewrites_paths_and_orders_columns(chexpert_release):
    frames = convert_release(chexpert_release)
    raw = pd.read_csv(chexpert_release / "train.csv")
    train = frames["train"]
    assert list(train.columns) == META_COLUMNS + LABELS
    assert len(train) == len(raw) == 48 and len(frames["val"]) == 16
    assert train["Path"].iloc[0] == "/".join(raw["Path"].iloc[0].split("/")[2:])
    assert train["Path"].str.match(r"^patient\d{5}/study\d+/view\d+_(frontal|lateral)\.jpg$").all()
    assert (chexpert_release / "train" / train["Path"].iloc[0]).is_file()
    pd.testing.assert_series_equal(train["Cardiomegaly"], raw["Cardiomegaly"], check_names=True)
    assert (train["Frontal/Lateral"] == "Lateral").any()  # all views kept by default
    frontal = convert_release(chexpert_release, frontal_only=True)["train"]
    assert len(frontal) == (raw["Frontal/Lateral"] == "Frontal").sum()
    assert (frontal["Frontal/Lateral"] == "Frontal").all()


def test_train_rows_and_labels_come_from_visualchexbert_when_there(tmp_path):
    """Stanford's train_visualCheXbert.csv (full-size release paths, 0/1 labels in its own order) beside the
    release: the train manifest takes its rows and labels, paths rewritten to the small release's images; the
    val manifest and an explicit --train-labels file behave as documented."""
    from pacx.data.prepare import run_converter
    from pacx.testing.chexpert import write_chexpert_release

    root = write_chexpert_release(tmp_path / "CheXpert-v1.0-small", n_train=20, n_valid=6, width=32,
                                  height=32, visualchexbert=True)
    visual = pd.read_csv(root / "train_visualCheXbert.csv")
    assert visual["Path"].str.startswith("CheXpert-v1.0/train/").all()
    frames = convert_release(root)
    train = frames["train"]
    assert list(train.columns) == META_COLUMNS + LABELS
    assert train["Path"].tolist() == ["/".join(p.split("/")[2:]) for p in visual["Path"]]
    assert all((root / "train" / p).is_file() for p in train["Path"])
    for label in LABELS:
        assert train[label].tolist() == visual[label].tolist(), label
    assert set(train[LABELS].to_numpy().ravel()) <= {0.0, 1.0}
    pd.testing.assert_frame_equal(frames["val"], convert_split(root / "valid.csv"))

    # an explicit file wins; the release's own train.csv when neither exists
    other = tmp_path / "labels.csv"
    visual.iloc[:5].to_csv(other, index=False)
    assert len(convert_release(root, train_labels=other)["train"]) == 5
    summary = run_converter("chexpert", root, tmp_path / "manifests", train_labels=str(other))
    assert summary["train"]["rows"] == 5
    assert len(pd.read_csv(tmp_path / "manifests" / "chexpert_train_split.csv")) == 5
    with pytest.raises(FileNotFoundError, match="train labels CSV not found: .*missing.csv"):
        convert_release(root, train_labels=tmp_path / "missing.csv")
    (root / "train_visualCheXbert.csv").unlink()
    pd.testing.assert_frame_equal(convert_release(root)["train"], convert_split(root / "train.csv"))


def test_parent_of_release_is_accepted(chexpert_release):
    assert len(convert_release(chexpert_release.parent)["val"]) == 16


def test_prepare_cli_writes_manifests_and_lists(tmp_path, chexpert_release, repo):
    out = tmp_path / "manifests"
    res = subprocess.run([sys.executable, str(repo / "scripts/prepare.py"), "chexpert", "--raw",
                          str(chexpert_release), "--out", str(out)],
                         capture_output=True, text=True, check=True)
    train = pd.read_csv(out / "chexpert_train_split.csv")
    assert len(train) == 48 and (out / "chexpert_val_split.csv").is_file()
    assert '"rows": 48' in res.stdout and '"lateral"' in res.stdout
    listing = subprocess.run([sys.executable, str(repo / "scripts/prepare.py"), "--list"],
                             capture_output=True, text=True, check=True).stdout
    assert "chexpert" in listing and "mae" in listing


@pytest.mark.bad_input
def test_missing_column_names_file_and_column(tmp_path, chexpert_release):
    """CheXpert CSV without a required column → ManifestError naming the CSV and the column."""
    bad = tmp_path / "train.csv"
    pd.read_csv(chexpert_release / "train.csv").drop(columns=["Frontal/Lateral"]).to_csv(bad, index=False)
    with pytest.raises(ManifestError,
                       match=r"train\.csv.*missing required column\(s\) \['Frontal/Lateral'\]"):
        convert_split(bad)


@pytest.mark.bad_input
def test_path_without_release_prefix_names_row(tmp_path, chexpert_release):
    """CheXpert CSV Path without its '<release>/<split>/' prefix → ManifestError
    naming the row and its line."""
    df = pd.read_csv(chexpert_release / "train.csv")
    df.loc[3, "Path"] = "view1_frontal.jpg"
    df.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(ManifestError, match=r"train\.csv: row 3 \(line 5\): Path 'view1_frontal\.jpg'"):
        convert_split(tmp_path / "train.csv")


@pytest.fixture()
def broken_release(tmp_path, chexpert_release):
    root = tmp_path / "CheXpert-v1.0-small"
    shutil.copytree(chexpert_release, root)
    paths = convert_release(root)["train"]["Path"]
    (root / "train" / paths.iloc[2]).unlink()  # missing
    (root / "train" / paths.iloc[5]).write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")  # corrupt
    return root, paths


@pytest.mark.bad_input
def test_missing_image_names_row_and_path(broken_release):
    """CheXpert image file missing → ManifestError naming the release CSV by its full path (with the
    CheXpert-v1.0-small folder), the row and its line in the file, and the image path."""
    root, paths = broken_release
    csv = root / "train.csv"
    assert pd.read_csv(csv)["Path"].iloc[2].endswith(paths.iloc[2])  # line 4 of the file holds row 2
    for given in (root, root.parent):  # the release folder or its parent
        with pytest.raises(ManifestError,
                           match=rf"^{re.escape(str(csv))}: 1 image\(s\) not found .*row 2 \(line 4\): "
                                 rf".*{paths.iloc[2]}"):
            CheXpertDataModule(str(given), num_workers=0, img_size=32).setup("fit")


@pytest.mark.bad_input
def test_corrupt_image_names_row_and_path(broken_release):
    """Corrupt (truncated) image → ManifestError naming the CSV, the row and its line, and the path."""
    root, paths = broken_release
    df = convert_release(root)["train"].drop(index=2)
    ds = ImageManifestDataset(df, root / "train", "Path", transform=resize_eval(32), source="train.csv")
    with pytest.raises(ManifestError,
                       match=rf"train\.csv: row 5 \(line 7\): cannot read image .*{paths.iloc[5]}"):
        ds[4]  # position 4 is original row 5 after dropping row 2


def test_skip_unreadable_drops_and_logs(broken_release, caplog):
    root, paths = broken_release
    dm = CheXpertDataModule(str(root), num_workers=0, img_size=32, skip_unreadable=True, batch_size=4)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 46
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped 2 of 48 rows" in msg and paths.iloc[2] in msg and paths.iloc[5] in msg


def test_datamodule_manifests_equal_in_memory_conversion(tmp_path, chexpert_release, repo):
    subprocess.run([sys.executable, str(repo / "scripts/prepare.py"), "chexpert", "--raw",
                    str(chexpert_release), "--out", str(tmp_path)], check=True, capture_output=True)
    a = CheXpertDataModule(str(chexpert_release), num_workers=0, img_size=32)
    b = CheXpertDataModule(str(chexpert_release), manifest_dir=str(tmp_path), num_workers=0, img_size=32)
    a.setup("fit"), b.setup("fit")
    assert a.datasets["train"].paths == b.datasets["train"].paths
    torch.manual_seed(0)
    x, y = a.datasets["val"][0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (0,)
    torch.testing.assert_close(x, b.datasets["val"][0][0])


def test_fraction_and_per_device_batch(chexpert_release):
    dm = CheXpertDataModule(str(chexpert_release), num_workers=0, img_size=32, fraction=0.25, batch_size=8)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 12 and dm.per_device_batch == 4
    loader = dm.train_dataloader()
    assert loader.batch_size == 4 and loader.drop_last
    assert len(loader.sampler) == 6 and len(loader) == 1  # this rank's half, one full per-device batch
    odd = CheXpertDataModule(str(chexpert_release), num_workers=0, batch_size=10)
    odd.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ValueError, match="global batch 10 does not divide by world size 4"):
        odd.setup("fit")


def test_train_transform_is_mae_augmentation(chexpert_release):
    dm = CheXpertDataModule(str(chexpert_release), num_workers=0, img_size=32)
    dm.setup("fit")
    ds = dm.datasets["train"]
    torch.manual_seed(0)
    a = ds[0][0]
    torch.manual_seed(1)
    b = ds[0][0]
    assert a.shape == (3, 32, 32) and not torch.allclose(a, b)  # random crops differ
    # grey -> 3 equal
    torch.testing.assert_close(a[0] * 0.229 + 0.485, a[1] * 0.224 + 0.456, atol=1e-5, rtol=0)


def test_release_root_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CheXpert release"):
        CheXpertDataModule(str(tmp_path), num_workers=0).setup("fit")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "x.csv")


def test_cached_datamodule_matches_pil_path(tmp_path, chexpert_release):
    """Cache at the eval size: validation tensors equal the PIL path's within one grey level."""
    from pacx.data.cache import build_image_cache

    frames = convert_release(chexpert_release)
    build_image_cache(frames["train"]["Path"], chexpert_release / "train", tmp_path / "train", 48, workers=0,
                      progress=False)
    build_image_cache(frames["val"]["Path"], chexpert_release / "valid", tmp_path / "val", 32, workers=0,
                      progress=False)
    pil = CheXpertDataModule(str(chexpert_release), num_workers=0, img_size=32, batch_size=16,
                             pin_memory=False)
    cached = CheXpertDataModule(str(chexpert_release), num_workers=0, img_size=32, batch_size=16,
                                pin_memory=False, train_cache=str(tmp_path / "train"),
                                val_cache=str(tmp_path / "val"))
    pil.setup("fit"), cached.setup("fit")
    x_pil, _ = next(iter(pil.val_dataloader()))
    raw, labels = next(iter(cached.val_dataloader()))
    assert raw.dtype == torch.uint8 and raw.shape == (16, 1, 32, 32)
    x_cache, _ = cached.on_after_batch_transfer((raw, labels), 0)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert ((x_cache - x_pil) * std * 255).abs().max() <= 1.0
    train, _ = cached.on_after_batch_transfer(next(iter(cached.train_dataloader())), 0)
    assert train.shape == (16, 3, 32, 32) and train.dtype == torch.float32


@pytest.mark.bad_input
def test_blank_path_in_release_csv_names_row(tmp_path, chexpert_release):
    """Release CSV row with a blank Path → ManifestError naming the CSV, the row and its line."""
    df = pd.read_csv(chexpert_release / "train.csv")
    df.loc[3, "Path"] = None
    df.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(ManifestError, match=r"train\.csv: 1 row\(s\) with a blank Path .*row 3 \(line 5\)"):
        convert_split(tmp_path / "train.csv")


@pytest.fixture()
def small_caches(tmp_path, chexpert_release):
    """Manifests in a folder, a train cache at 48 px and a val cache at 32 px."""
    from pacx.data.cache import build_image_cache
    from pacx.data.chexpert import MANIFESTS

    frames = convert_release(chexpert_release)
    for split, df in frames.items():
        df.to_csv(tmp_path / MANIFESTS[split], index=False)
    for split, folder, size in (("train", "train", 48), ("val", "valid", 32)):
        build_image_cache(frames[split]["Path"], chexpert_release / folder, tmp_path / f"cache_{split}", size,
                          workers=0, progress=False)
    return tmp_path


def _cached_datamodule(caches, release, img_size: int) -> CheXpertDataModule:
    """The CheXpert data module on the manifests and the train / val caches of ``caches``."""
    return CheXpertDataModule(str(release), manifest_dir=str(caches), num_workers=0, img_size=img_size,
                              train_cache=str(caches / "cache_train"), val_cache=str(caches / "cache_val"))


@pytest.mark.bad_input
def test_blank_path_with_a_cache_names_manifest_and_row(small_caches, chexpert_release):
    """Cached CheXpert manifest row with a blank Path → ManifestError naming the manifest, the row and its
    line (not a cache lookup of the path "nan")."""
    from pacx.data.chexpert import MANIFESTS

    csv = small_caches / MANIFESTS["train"]
    df = pd.read_csv(csv)
    df.loc[4, "Path"] = None
    df.to_csv(csv, index=False)
    dm = _cached_datamodule(small_caches, chexpert_release, 32)
    with pytest.raises(ManifestError, match=rf"{re.escape(str(csv))}: 1 row\(s\) with a blank Path .*"
                                            r"row 4 \(line 6\)"):
        dm.setup("fit")


@pytest.mark.bad_input
def test_val_cache_of_another_size_is_refused(small_caches, chexpert_release):
    """Validation image cache at another size than img_size → CacheError naming the cache and both sizes
    (its pixels would not be the uncached evaluation resize's)."""
    from pacx.data.cache import CacheError

    dm = _cached_datamodule(small_caches, chexpert_release, 24)
    with pytest.raises(CacheError, match=rf"{re.escape(str(small_caches / 'cache_val'))}: 32 px images, .*"
                                         r"img_size 24"):
        dm.setup("fit")
    _cached_datamodule(small_caches, chexpert_release, 32).setup("fit")

"""Segmentation converters (cxlseg, covidqu_seg, qata) on synthetic releases in the official layouts."""

import logging

import pandas as pd
import pytest

from pacx.data.converters import segmentation as seg
from pacx.data.manifest import ManifestError
from pacx.data.prepare import CONVERTERS
from pacx.testing.seg_benchmarks import SEG_RELEASE_WRITERS

IMAGE_ROOTS = {
    "cxlseg": lambda raw: raw / "files",
    "covidqu_seg": lambda raw: raw / "Lung Segmentation Data" / "Lung Segmentation Data",
    "qata": lambda raw: raw / "QaTa-COV19-v2",
}
PREPARE = {"cxlseg": seg.prepare_cxlseg, "covidqu_seg": seg.prepare_covidqu_seg, "qata": seg.prepare_qata}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    return {name: writer(tmp_path_factory.mktemp(name), 0) for name, writer in SEG_RELEASE_WRITERS.items()}


def read_splits(out):
    return {s: pd.read_csv(out / f"{s}.csv") for s in seg.SPLITS}


@pytest.mark.parametrize("name", sorted(SEG_RELEASE_WRITERS))
def test_registered_as_segmentation(name):
    conv = CONVERTERS[name]
    assert conv.task == "segmentation" and conv.metric == "iou"


@pytest.mark.parametrize("name", ["covidqu_seg", "qata"])
def test_rows_pair_existing_images_and_masks(name, releases, tmp_path, caplog):
    raw = releases[name]
    with caplog.at_level(logging.WARNING):
        summary = PREPARE[name](raw, tmp_path)
    frames = read_splits(tmp_path)
    root = IMAGE_ROOTS[name](raw)
    for split, df in frames.items():
        assert list(df.columns) == ["img_path", "mask_path"]
        assert len(df) == summary[split]["rows"] > 0
        assert all((root / p).is_file() for p in df["img_path"])
        assert all((root / p).is_file() for p in df["mask_path"])
    # the one image without a mask is reported, logged, and not in any manifest
    unpaired = summary["images_without_mask"]
    assert unpaired["count"] == 1
    assert (root / unpaired["first"][0]).is_file()
    assert all(unpaired["first"][0] not in df["img_path"].values for df in frames.values())
    assert "without a mask" in caplog.text and unpaired["first"][0] in caplog.text


def test_covidqu_official_splits_and_sorted(releases, tmp_path):
    seg.prepare_covidqu_seg(releases["covidqu_seg"], tmp_path)
    frames = read_splits(tmp_path)
    for split, folder in {"train": "Train", "val": "Val", "test": "Test"}.items():
        df = frames[split]
        assert df["img_path"].str.startswith(f"{folder}/").all()
        assert (df["mask_path"] == df["img_path"].str.replace("/images/", "/lung masks/", regex=False)).all()
        for _, group in df.groupby(df["img_path"].str.rsplit("/", n=1).str[0], sort=False):
            assert group["img_path"].tolist() == sorted(group["img_path"])
    assert len(frames["train"]) == 3 * 5 - 1 and len(frames["val"]) == len(frames["test"]) == 3 * 4
    # the inner "Lung Segmentation Data" folder is accepted as raw too
    out2 = tmp_path / "again"
    inner = releases["covidqu_seg"] / "Lung Segmentation Data" / "Lung Segmentation Data"
    seg.prepare_covidqu_seg(inner, out2)
    pd.testing.assert_frame_equal(read_splits(out2)["train"], frames["train"])


def test_qata_split_sizes_and_determinism(releases, tmp_path):
    summary = seg.prepare_qata(releases["qata"], tmp_path / "a", seed=42)
    a = read_splits(tmp_path / "a")
    # 20 paired train images: sklearn rounds the test share up -> 2 val, 18 train; the Test Set whole
    assert (summary["train"]["rows"], summary["val"]["rows"], summary["test"]["rows"]) == (18, 2, 10)
    assert a["train"]["img_path"].str.startswith("Train Set/Images/").all()
    assert a["val"]["img_path"].str.startswith("Train Set/Images/").all()
    assert a["test"]["img_path"].str.startswith("Test Set/Images/").all()
    assert not set(a["train"]["img_path"]) & set(a["val"]["img_path"])
    assert (a["train"]["mask_path"] == a["train"]["img_path"].str.replace(
        "Images/", "Ground-truths/mask_", regex=False)).all()
    seg.prepare_qata(releases["qata"], tmp_path / "b", seed=42)
    b = read_splits(tmp_path / "b")
    for split in seg.SPLITS:
        pd.testing.assert_frame_equal(a[split], b[split])
    seg.prepare_qata(releases["qata"], tmp_path / "c", seed=7)
    c = read_splits(tmp_path / "c")
    assert set(c["val"]["img_path"]) != set(a["val"]["img_path"])
    pd.testing.assert_frame_equal(c["test"], a["test"])


def test_cxlseg_paths_and_official_splits(releases, tmp_path):
    raw = releases["cxlseg"]
    summary = seg.prepare_cxlseg(raw, tmp_path)
    frames = read_splits(tmp_path)
    split_csv = pd.read_csv(raw / "CXLSeg-split.csv")
    assert {s: summary[s]["rows"] for s in seg.SPLITS} == {"train": 16, "val": 10, "test": 10}
    assert summary["train"]["patients"] == 8
    row = split_csv.iloc[0]
    sid = str(row["subject_id"])
    expected = f"p{sid[:2]}/p{sid}/s{row['study_id']}/{row['dicom_id']}"
    assert frames["train"]["img_path"].iloc[0] == expected + ".jpg"
    assert frames["train"]["mask_path"].iloc[0] == expected + "-mask.jpg"
    val_ids = set(split_csv.loc[split_csv["split"] == "validate", "dicom_id"])
    assert {p.rsplit("/", 1)[1][:-4] for p in frames["val"]["img_path"]} == val_ids
    assert all((raw / "files" / p).is_file() for df in frames.values() for p in df["img_path"])
    # without --check-files the mask-less row stays; with it, it is dropped and reported
    checked = seg.prepare_cxlseg(raw, tmp_path / "checked", check_files=True)
    assert checked["train"]["rows"] == 15 and checked["missing_files"]["count"] == 1
    assert checked["missing_files"]["first"][0].endswith("-mask.jpg")
    train = pd.read_csv(tmp_path / "checked" / "train.csv")
    assert all((raw / "files" / p).is_file() for p in train["mask_path"])


def test_cxlseg_tsv_by_extension(releases, tmp_path):
    tsv = tmp_path / "CXLSeg-split.tsv"
    pd.read_csv(releases["cxlseg"] / "CXLSeg-split.csv").to_csv(tsv, sep="\t", index=False)
    summary = seg.prepare_cxlseg(tmp_path, tmp_path / "out")
    assert summary["val"]["rows"] == 10


def test_cxlseg_missing_split_column_names_file_and_column(releases, tmp_path):
    bad = tmp_path / "CXLSeg-split.csv"
    pd.read_csv(releases["cxlseg"] / "CXLSeg-split.csv").drop(columns=["split"]).to_csv(bad, index=False)
    with pytest.raises(ManifestError, match=r"CXLSeg-split\.csv.*\['split'\]"):
        seg.prepare_cxlseg(tmp_path, tmp_path / "out")


def test_cxlseg_unknown_split_value_names_row(releases, tmp_path):
    df = pd.read_csv(releases["cxlseg"] / "CXLSeg-split.csv")
    df.loc[4, "split"] = "valid"
    df.to_csv(tmp_path / "CXLSeg-split.csv", index=False)
    with pytest.raises(ManifestError, match=r"row 4: unknown 'split' value\(s\) \['valid'\]"):
        seg.prepare_cxlseg(tmp_path, tmp_path / "out")


def test_missing_release_errors_name_the_place(tmp_path):
    with pytest.raises(FileNotFoundError, match="CXLSeg"):
        seg.prepare_cxlseg(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="QaTa-COV19-v2"):
        seg.prepare_qata(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="Lung Segmentation Data"):
        seg.prepare_covidqu_seg(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("name", sorted(SEG_RELEASE_WRITERS))
def test_writers_are_deterministic(name, tmp_path):
    a = SEG_RELEASE_WRITERS[name](tmp_path / "a", 3)
    b = SEG_RELEASE_WRITERS[name](tmp_path / "b", 3)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 20
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)

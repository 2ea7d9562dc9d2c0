"""Probe data sources: the label policy (only 0/1 rows), seeded subsets, image/label alignment, errors."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pacx.constants import IMAGENET_MEAN, IMAGENET_STD
from pacx.data.manifest import ManifestError
from pacx.data.probe import ArrayProbeData, ManifestProbeData, seeded_subset
from pacx.data.symile_files import SymileFileError


def write_manifest(tmp_path, labels: list) -> tuple[str, str]:
    """Gray images whose intensity is 10 × (row + 1), and a CSV of paths + ``Cardiomegaly``."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(len(labels)):
        Image.fromarray(np.full((30, 40), 10 * (i + 1), np.uint8), mode="L").save(root / f"img{i}.png")
    csv = tmp_path / "manifest.csv"
    paths = [f"img{i}.png" for i in range(len(labels))]
    pd.DataFrame({"Path": paths, "Cardiomegaly": labels}).to_csv(csv, index=False)
    return str(csv), str(root)


def gray_level(images: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation of the red channel: the 0–255 gray level of each image."""
    return ((images[:, 0].mean(dim=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255).numpy()


def test_manifest_probe_data_keeps_only_0_1_rows_aligned_with_their_images(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pacx.data.probe")
    labels = [1.0, 0.0, -1.0, None, 1.0, 0.0, 0.0, 1.0, "x"]
    csv, root = write_manifest(tmp_path, labels)
    images, y = ManifestProbeData(csv, root, "Cardiomegaly", img_size=16).load()
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.float32
    kept = [0, 1, 4, 5, 6, 7]
    np.testing.assert_allclose(gray_level(images), [10 * (i + 1) for i in kept], atol=0.5)
    assert y.tolist() == [1, 0, 1, 0, 0, 1] and y.dtype == torch.int64
    assert "dropped 3 of 9 rows" in caplog.text and csv in caplog.text


def test_manifest_probe_data_subset_is_seeded_and_errors_name_file_and_column(tmp_path):
    csv, root = write_manifest(tmp_path, [0, 1] * 10)
    a = ManifestProbeData(csv, root, "Cardiomegaly", img_size=8, max_samples=8, seed=3).load()
    b = ManifestProbeData(csv, root, "Cardiomegaly", img_size=8, max_samples=8, seed=3).load()
    assert len(a[0]) == 8 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    rows = seeded_subset(20, 8, 3)
    np.testing.assert_allclose(gray_level(a[0]), 10 * (rows + 1), atol=0.5)
    with pytest.raises(ManifestError, match=rf"{csv}.*missing required column.*'Edema'"):
        ManifestProbeData(csv, root, "Edema").load()
    with pytest.raises(ValueError, match=rf"{csv}: column 'Cardiomegaly' leaves \d negative and \d positive"):
        ManifestProbeData(csv, root, "Cardiomegaly", max_samples=1).load()


def test_manifest_probe_data_reads_a_chexpert_release_csv(chexpert_release):
    """The release's train.csv as is: paths relative to the release's parent, -1 / blank labels dropped."""
    csv = chexpert_release / "train.csv"
    raw = pd.read_csv(csv)["Cardiomegaly"]
    images, y = ManifestProbeData(str(csv), str(chexpert_release.parent), "Cardiomegaly", img_size=32).load()
    assert images.shape == (int(raw.isin([0, 1]).sum()), 3, 32, 32)
    assert y.tolist() == raw[raw.isin([0, 1])].astype(int).tolist()


def write_array(tmp_path, n: int = 12) -> str:
    """float32 [n, 3, 20, 20] whose row i is the constant i."""
    path = tmp_path / "cxr_val.npy"
    np.save(path, np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 3, 20, 20)).copy())
    return str(path)


def test_array_probe_data_aligns_labels_by_index_column_and_resizes(tmp_path):
    npy = write_array(tmp_path)
    order = [5, 2, 9, 0, 11, 7, 3, 1]  # CSV rows in another order than the array
    labels = [1, 0, 1, 0, -1, 1, 0, 1]
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"row": order, "Edema": labels}).to_csv(csv, index=False)
    images, y = ArrayProbeData(npy, str(csv), "Edema", index_column="row", img_size=8).load()
    assert images.shape == (7, 3, 8, 8)
    rows = images.mean(dim=(1, 2, 3)).round().long().tolist()  # a constant image stays constant when resized
    assert rows == sorted(r for r, lab in zip(order, labels) if lab in (0, 1))  # read in ascending row order
    assert y.tolist() == [dict(zip(order, labels))[r] for r in rows]


def test_array_probe_data_row_aligned_csv_and_errors(tmp_path):
    npy = write_array(tmp_path, n=6)
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"Edema": [0, 1, 0, 1, 0, 1]}).to_csv(csv, index=False)
    images, y = ArrayProbeData(npy, str(csv), "Edema", img_size=20).load()
    assert images.mean(dim=(1, 2, 3)).tolist() == [0, 1, 2, 3, 4, 5] and y.tolist() == [0, 1, 0, 1, 0, 1]
    short = tmp_path / "short.csv"
    pd.DataFrame({"Edema": [0, 1, 0, 1], "row": [0, 1, 2, 6]}).to_csv(short, index=False)
    with pytest.raises(ManifestError, match=rf"{short} has 4 rows but {npy} has 6"):
        ArrayProbeData(npy, str(short), "Edema").load()
    with pytest.raises(ManifestError, match=rf"{short}: row 3: column 'row' holds '6', not a row of {npy}"):
        ArrayProbeData(npy, str(short), "Edema", index_column="row").load()
    with pytest.raises(ManifestError, match=rf"{short}.*'Effusion'"):
        ArrayProbeData(npy, str(short), "Effusion").load()
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((6, 20, 20), np.float32))
    with pytest.raises(SymileFileError, match=rf"{flat}: expected images of shape \[N, 3, H, W\]"):
        ArrayProbeData(str(flat), str(csv), "Edema").load()

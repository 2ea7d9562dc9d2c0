"""Degenerate input is an error naming the file: empty splits (every stage) and blank / NaN labels."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pacx.data.manifest import ImageManifestDataset, ManifestError, clean_labels
from pacx.data.registry import BENCHMARKS
from pacx.data.stage3 import BenchmarkDataModule
from pacx.data.symile_files import SymileFileError, validate_split


def _images(root: Path, n: int) -> list[str]:
    for i in range(n):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(root / f"{i}.png")
    return [f"{i}.png" for i in range(n)]


@pytest.mark.bad_input
def test_header_only_manifest_is_an_error_naming_it(tmp_path):
    """Manifest with a header and no rows → ManifestError "<csv>: no rows"."""
    with pytest.raises(ManifestError, match=r"train\.csv: no rows"):
        ImageManifestDataset(pd.DataFrame({"Path": [], "y": []}), tmp_path, "Path", ["y"], source="train.csv")


@pytest.mark.bad_input
def test_blank_and_nan_labels_name_the_rows(tmp_path):
    """Blank / NaN / non-numeric label cells (binary, multilabel) → ManifestError naming the first 5 rows
    with their lines, and the count."""
    paths = _images(tmp_path, 8)
    df = pd.DataFrame({"Path": paths, "a": [1, None, 0, "x", 1, None, None, None],
                       "b": [0, 1, None, 0, 0, 1, 1, 0]})
    with pytest.raises(ManifestError) as err:
        ImageManifestDataset(df, tmp_path, "Path", ["a", "b"], source="labels.csv")
    msg = str(err.value)
    assert "labels.csv: 6 blank or non-numeric label cell(s) in 6 row(s)" in msg
    assert ("row 1 (line 3): ['a']" in msg and "row 2 (line 4): ['b']" in msg
            and "row 3 (line 5): ['a']" in msg)
    assert "row 7" not in msg  # the first five rows only


def test_a_declared_fill_policy_fills_and_logs_the_count(caplog):
    df = pd.DataFrame({"a": [1, None, 0], "b": [None, None, 1]})
    with caplog.at_level(logging.WARNING):
        labels = clean_labels(df, ["a", "b"], "chexpert.csv", label_fill=0)
    assert labels.tolist() == [[1, 0], [0, 0], [0, 1]]
    assert "chexpert.csv: 3 blank or non-numeric label cells filled with 0" in caplog.text


def test_spec_fill_policy_reaches_the_dataset(tb, monkeypatch, caplog):
    raw, manifests = tb
    spec = BENCHMARKS["tb"]
    train = manifests / spec.manifest_files["train"]
    df = pd.read_csv(train)
    df.loc[[0, 3], "Label"] = None
    blank = manifests.parent / "blank"
    blank.mkdir()
    for split, name in spec.manifest_files.items():
        (df if split == "train" else pd.read_csv(manifests / name)).to_csv(blank / name, index=False)
    with pytest.raises(ManifestError, match=r"2 blank or non-numeric label cell\(s\) in 2 row\(s\)"):
        BenchmarkDataModule("tb", str(raw), str(blank), batch_size=4, num_workers=0).setup("fit")
    monkeypatch.setitem(BENCHMARKS, "tb", replace(spec, label_fill=0))
    with caplog.at_level(logging.WARNING):
        dm = BenchmarkDataModule("tb", str(raw), str(blank), batch_size=4, num_workers=0)
        dm.setup("fit")
    assert (len(dm.datasets["train"]) == len(df)
            and "2 blank or non-numeric label cells filled with 0" in caplog.text)


@pytest.mark.bad_input
def test_stage3_header_only_manifest_fails_before_any_work(tb, stage1_run, tmp_path):
    """Stage 3 on a header-only train manifest → ManifestError naming that CSV, before training and
    before any feature cache is written."""
    from Stage3_eval import main
    from tests.lit.test_classify import stage3_args

    raw, manifests = tb
    spec = BENCHMARKS["tb"]
    empty = tmp_path / "manifests"
    empty.mkdir()
    for split, name in spec.manifest_files.items():
        df = pd.read_csv(manifests / name)
        (df.iloc[:0] if split == "train" else df).to_csv(empty / name, index=False)
    run = tmp_path / "run"
    with pytest.raises(ManifestError, match=rf"{empty / spec.manifest_files['train']}: no rows"):
        main(stage3_args("tb", raw, empty, run, stage1_run, "--model.feature_cache_dir",
                         str(tmp_path / "fc")))
    assert not list((tmp_path / "fc").glob("*.npy"))
    assert not (run / "checkpoints").exists()


@pytest.mark.bad_input
def test_stage1_empty_train_csv_fails_naming_it(chexpert_release, tmp_path):
    """Stage 1 on a release whose train.csv has no rows → ManifestError naming train.csv; no "completed"
    run record, no checkpoint."""
    import shutil

    from Stage1_MAE import main
    from tests.conftest import stage1_args

    release = tmp_path / "CheXpert-v1.0-small"
    shutil.copytree(chexpert_release, release)
    pd.read_csv(release / "train.csv").iloc[:0].to_csv(release / "train.csv", index=False)
    run = tmp_path / "run"
    with pytest.raises(ManifestError, match=rf"{release / 'train.csv'}: no rows"):
        main(stage1_args(run, release, "--trainer.max_steps", "1"))
    assert not (run / "checkpoints").exists()
    assert (not (run / "run.json").exists()
            or json.loads((run / "run.json").read_text())["status"] != "completed")


@pytest.mark.bad_input
def test_empty_symile_split_is_an_error_naming_the_file(tmp_path):
    """Symile-MIMIC split whose arrays have N = 0 → SymileFileError naming the file."""
    from pacx.testing.symile import write_symile_release

    root = write_symile_release(tmp_path / "data_npy", n_train=4, n_val=10, n_test_queries=10, cxr_size=16)
    for path in (root / "train").glob("*.npy"):
        np.save(path, np.load(path)[:0])
    with pytest.raises(SymileFileError, match=r"train/\w+_train\.npy: no rows \(N=0\)"):
        validate_split(root, "train", "labs")


def _benchmark_release(tmp_path: Path, name: str, table: pd.DataFrame) -> tuple[Path, Path]:
    """``table`` as every split manifest of benchmark ``name``, each path a tiny PNG: (root, manifests)."""
    spec = BENCHMARKS[name]
    root, manifests = tmp_path / "raw", tmp_path / "manifests"
    images = root / spec.image_dirs["train"]
    images.mkdir(parents=True)
    manifests.mkdir()
    for path in table[spec.path_column]:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / path)
    for file in spec.manifest_files.values():
        table.to_csv(manifests / file, index=False)
    return root, manifests


@pytest.mark.bad_input
def test_low_data_subset_errors_name_the_manifest_rows(tmp_path):
    """Missing image in a low-data (train_fraction < 1) subset → ManifestError naming its row and line in
    the manifest CSV, not its position in the subset.

    A low-data train subset keeps the manifest's row numbers."""
    paths = [f"{i}.png" for i in range(20)]
    root, manifests = _benchmark_release(tmp_path, "tb", pd.DataFrame({"Path": paths,
                                                                       "Label": [i % 2 for i in range(20)]}))
    dm = BenchmarkDataModule("tb", str(root), str(manifests), batch_size=2, num_workers=0,
                             train_fraction=0.25, subset_seed=0)
    subset, _ = dm.manifest_table("train")
    assert len(subset) == 5
    assert subset.index.tolist() == [paths.index(p) for p in subset["Path"]]  # the CSV's rows
    victim = subset["Path"].iat[-1]
    row = paths.index(victim)
    assert row != len(subset) - 1  # its position in the subset differs from its row in the CSV
    (root / BENCHMARKS["tb"].image_dirs["train"] / victim).unlink()
    with pytest.raises(ManifestError, match=rf"row {row} \(line {row + 2}\): .*/{victim}"):
        dm.build_dataset("train")


@pytest.mark.bad_input
def test_low_data_onehot_error_names_the_manifest_row(tmp_path):
    """One-hot row without exactly one 1 in a low-data subset → ManifestError naming its row and line in the
    manifest CSV."""
    classes = list(BENCHMARKS["chestx6"].labels)
    onehot = np.zeros((20, len(classes)), np.int64)
    onehot[np.arange(20), np.arange(20) % 5] = 1  # classes 0-4 only
    onehot[13, 5] = 1  # row 13: the only Tuberculosis positive (always picked), and a second 1
    table = pd.DataFrame({"Path": [f"{i}.png" for i in range(20)], **dict(zip(classes, onehot.T))})
    root, manifests = _benchmark_release(tmp_path, "chestx6", table)
    dm = BenchmarkDataModule("chestx6", str(root), str(manifests), batch_size=2, num_workers=0,
                             train_fraction=0.3, subset_seed=0)
    assert "13.png" in dm.manifest_table("train")[0]["Path"].tolist()
    with pytest.raises(ManifestError, match=r"chestx6_train_split\.csv: row 13 \(line 15\): one-hot"):
        dm.build_dataset("train")


@pytest.mark.bad_input
def test_blank_image_path_names_the_rows(tmp_path, caplog):
    """Manifest row with a blank / NaN image path → ManifestError naming the CSV, the rows and their lines
    (with ``skip_unreadable``: the rows are dropped and logged)."""
    paths = _images(tmp_path, 3)
    (tmp_path / "m.csv").write_text("Path,y\n" + f"{paths[0]},0\n,1\n{paths[2]},0\n")
    df = pd.read_csv(tmp_path / "m.csv")
    assert df["Path"].isna().iat[1]
    for check_files in (True, False):
        with pytest.raises(ManifestError, match=r"m\.csv: 1 row\(s\) with a blank Path .*row 1 \(line 3\)"):
            ImageManifestDataset(df, tmp_path, "Path", ["y"], source="m.csv", check_files=check_files)
    with caplog.at_level(logging.WARNING):
        ds = ImageManifestDataset(df, tmp_path, "Path", ["y"], source="m.csv", skip_unreadable=True)
    assert ds.paths == [paths[0], paths[2]] and ds.rows.tolist() == [0, 2]
    assert ds.labels.tolist() == [[0], [0]]
    assert "dropped 1 of 3 rows" in caplog.text and "row 1 (line 3)" in caplog.text


@pytest.mark.bad_input
def test_manifest_with_an_index_column_names_its_own_rows(tmp_path):
    """Manifest that has a column named ``index`` and a missing image → ManifestError naming the row by its
    position in the CSV, not by the value of that column."""
    paths = _images(tmp_path, 3)
    df = pd.DataFrame({"index": [10, 20, 30], "Path": [paths[0], "missing.png", paths[2]], "y": [0, 1, 0]})
    with pytest.raises(ManifestError, match=r"m\.csv: 1 image\(s\) not found .*row 1 \(line 3\): .*missing"):
        ImageManifestDataset(df, tmp_path, "Path", ["y"], source="m.csv")
    ds = ImageManifestDataset(df.assign(Path=paths), tmp_path, "Path", ["y"], source="m.csv")
    assert ds.rows.tolist() == [0, 1, 2] and ds.labels.tolist() == [[0], [1], [0]]

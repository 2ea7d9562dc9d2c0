"""Teacher feature extraction (pacx.teachers, scripts/extract_teacher_features.py,
scripts/benchmark_teachers.py).

A tiny synthetic Symile tree (32 px CXR, 2 candidates per query) and small teachers saved to files:
ECGFounder ``demo_small`` and a narrow labs DAE. Expected features are computed independently here,
on the whole array at once, with the encoder layers called directly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pacx.data.symile_files import SymileFileError
from pacx.models.ecgfounder import create_ecgfounder, load_ecgfounder, preprocess_ecg
from pacx.models.labs_dae import LabsDAE, LabsDAEConfig, load_labs_dae
from pacx.teachers import TEACHERS, Teacher, extract_teacher_features, load_teachers
from pacx.testing.symile import write_symile_release
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test", "test_uni")
ECG_DIM, LABS_DIM = 128, 16  # demo_small's last width; the small DAE's latent


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """train 12, val 4, test 4 queries x 2 = 8 rows, and test_uni (4 rows) without any feature file."""
    out = write_symile_release(tmp_path_factory.mktemp("symile") / "data_npy", n_train=12, n_val=4,
                               n_test_queries=4, n_candidates=2, cxr_size=32, seed=0,
                               write_teacher_features=True)
    for path in out.glob("*/*_features.npy"):
        path.unlink()
    return out


@pytest.fixture
def root(release, tmp_path) -> Path:
    return Path(shutil.copytree(release, tmp_path / "data_npy"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save({"state_dict": create_ecgfounder("demo_small", head=False).state_dict()}, d / "ecg.pth")
    dae = LabsDAE(LabsDAEConfig(hidden_dim=32, latent_dim=LABS_DIM))
    # Lightning-like
    torch.save({"state_dict": {f"model.{k}": v for k, v in dae.state_dict().items()}}, d / "dae.ckpt")
    return {"ecg": d / "ecg.pth", "dae": d / "dae.ckpt"}


def run_cli(root: Path, weights: dict[str, Path], *extra: str) -> None:
    load_script("extract_teacher_features").main([
        "--data-root", str(root), "--ecgfounder", str(weights["ecg"]), "--ecgfounder-config", "demo_small",
        "--labs-dae", str(weights["dae"]), "--batch-size", "5", "--no-progress", *extra,
    ])


def teachers(weights: dict[str, Path]):
    return load_teachers({"ecg": weights["ecg"], "labs": weights["dae"]}, {"ecg": {"config": "demo_small"}})


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.glob("*/*_features.npy"))}


# ------------------------------------------------------------------------------------------ results


def test_writes_features_equal_to_a_whole_array_computation(root, weights):
    run_cli(root, weights)  # batch 5: partial last batches on every split
    ecg_model = load_ecgfounder(weights["ecg"], "demo_small")
    dae = load_labs_dae(weights["dae"])
    for split in ("train", "val", "test"):
        ecg = np.load(root / split / "ecg_features.npy")
        labs = np.load(root / split / "labs_features.npy")
        n = len(np.load(root / split / f"hadm_id_{split}.npy"))
        assert ecg.shape == (n, ECG_DIM) and labs.shape == (n, LABS_DIM)
        assert ecg.dtype == labs.dtype == np.float32

        with torch.no_grad():
            # all rows at once
            x = torch.from_numpy(preprocess_ecg(np.load(root / split / f"ecg_{split}.npy")))
            np.testing.assert_allclose(ecg, ecg_model(x).numpy(), rtol=1e-4, atol=1e-5)

            pct = torch.from_numpy(np.load(root / split / f"labs_percentiles_{split}.npy")).float()
            obs = torch.from_numpy(np.load(root / split / f"labs_missingness_{split}.npy")).float()
            # placeholders kept (docs/datasets.md#teacher-features)
            raw = dae.encoder(torch.cat([pct, obs], dim=1)).numpy()
            zeroed = dae.encoder(torch.cat([pct * obs, obs], dim=1)).numpy()
        assert (obs == 0).any() and (pct[obs == 0] > 0).any()  # there are placeholders to zero
        np.testing.assert_allclose(labs, raw, rtol=1e-5, atol=1e-6)
        assert not np.allclose(labs, zeroed, atol=1e-4)

    n_uni = len(np.load(root / "test_uni" / "hadm_id_test.npy"))
    for key, dim in (("ecg_features", ECG_DIM), ("labs_features", LABS_DIM)):
        uni = np.load(root / "test_uni" / f"{key}.npy")
        assert uni.shape == (n_uni, dim) and n_uni == 4
        np.testing.assert_array_equal(uni, np.load(root / "test" / f"{key}.npy")[:n_uni])
    assert not list(root.glob("*/.*.tmp*"))  # no temporary files left


def test_second_run_skips_and_overwrite_rewrites(root, weights):
    run_cli(root, weights)
    first = mtimes(root)
    assert len(first) == 2 * len(SPLITS)
    run_cli(root, weights)
    assert mtimes(root) == first
    run_cli(root, weights, "--overwrite", "--splits", "val", "test", "test_uni")
    again = mtimes(root)
    changed = {k for k in first if again[k] != first[k]}
    assert changed == {f"{s}/{k}_features.npy" for s in ("val", "test", "test_uni") for k in ("ecg", "labs")}


def test_wrong_shaped_output_is_recomputed(root, weights):
    bad = root / "val" / "ecg_features.npy"
    np.save(bad, np.zeros((4, 3), np.float32))
    results = extract_teacher_features(root, teachers(weights), ["val"], batch_size=3, progress=False)
    assert {(r.key, r.status) for r in results} == {("ecg_features", "written"), ("labs_features", "written")}
    assert np.load(bad).shape == (4, ECG_DIM)


def test_one_teacher_only(root, weights):
    load_script("extract_teacher_features").main(["--data-root", str(root), "--labs-dae", str(weights["dae"]),
                                                  "--splits", "train", "--no-progress"])
    assert [p.name for p in (root / "train").glob("*_features.npy")] == ["labs_features.npy"]
    script = load_script("extract_teacher_features")
    with pytest.raises(SystemExit):
        script.main(["--data-root", str(root)])
    with pytest.raises(SystemExit):  # one teacher given twice
        script.main(["--data-root", str(root), "--labs-dae", str(weights["dae"]), "--teacher",
                     f"labs={weights['dae']}"])
    with pytest.raises(KeyError, match="unknown teacher 'ekg'"):
        script.main(["--data-root", str(root), "--teacher", f"ekg={weights['ecg']}"])
    # --teacher NAME=WEIGHTS is the general form of --labs-dae
    script.main(["--data-root", str(root), "--teacher", f"labs={weights['dae']}", "--splits", "val",
                 "--no-progress"])
    assert (root / "val" / "labs_features.npy").is_file() and not (root / "val" / "ecg_features.npy").exists()


# ------------------------------------------------------------------------------------------ interruption


def test_interrupted_run_leaves_no_partial_file_and_rerun_completes(root, weights, monkeypatch):
    final = root / "train" / "ecg_features.npy"
    stale = final.with_name(f".{final.name}.tmp999999999")  # left by a killed run (no such process)
    stale.write_bytes(b"partial")
    calls = {"n": 0}
    forward = Teacher.encode

    def failing(self, *x):
        calls["n"] += 1
        if calls["n"] == 2:
            # mid-split: one batch of train (the ECG, first) is already in the temporary file
            raise KeyboardInterrupt
        return forward(self, *x)

    monkeypatch.setattr(Teacher, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        extract_teacher_features(root, teachers(weights), ["train"], batch_size=5, progress=False)
    assert not final.exists()
    assert not list((root / "train").glob(".*.tmp*"))  # ours removed on failure, the stale one on start

    # An interrupted --overwrite keeps the previous complete file untouched.
    monkeypatch.setattr(Teacher, "encode", forward)
    extract_teacher_features(root, teachers(weights), ["train"], batch_size=5, progress=False)
    complete = np.load(final)
    assert complete.shape == (12, ECG_DIM)
    calls["n"] = 0
    monkeypatch.setattr(Teacher, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        extract_teacher_features(root, teachers(weights), ["train"], batch_size=5, overwrite=True,
                                 progress=False)
    np.testing.assert_array_equal(np.load(final), complete)


# ------------------------------------------------------------------------------------------ bad input


def test_wrong_ecg_layout(root, weights):
    path = root / "train" / "ecg_train.npy"
    np.save(path, np.load(path)[:, 0].transpose(0, 2, 1))  # [N, 12, 5000]
    with pytest.raises(SymileFileError,
                       match=r"ecg_train\.npy: expected shape \[N, 1, 5000, 12\], got \[12, 12, 5000\]"):
        run_cli(root, weights, "--splits", "train")
    assert not (root / "train" / "ecg_features.npy").exists()


def test_row_counts_differ(root, weights):
    path = root / "val" / "labs_percentiles_val.npy"
    np.save(path, np.load(path)[:-1])
    with pytest.raises(SymileFileError, match=r"row counts differ: .*labs_percentiles_val\.npy has N=3"):
        run_cli(root, weights, "--splits", "val")


def test_non_finite_ecg_row(root, weights):
    path = root / "train" / "ecg_train.npy"
    ecg = np.load(path)
    ecg[7, 0, 100, 3] = np.nan
    np.save(path, ecg)
    with pytest.raises(SymileFileError, match=r"ecg_train\.npy: row 7 has NaN or inf"):
        run_cli(root, weights, "--splits", "train")
    assert not (root / "train" / "ecg_features.npy").exists()


def test_split_rules(root, weights):
    with pytest.raises(ValueError, match="val_retrieval"):
        extract_teacher_features(root, teachers(weights), ["val_retrieval"], progress=False)
    with pytest.raises(SymileFileError, match="extract the test split first"):
        extract_teacher_features(root, teachers(weights), ["test_uni"], progress=False)
    hadm = root / "test_uni" / "hadm_id_test.npy"
    np.save(hadm, np.load(hadm)[::-1].copy())  # no longer the queries' label_hadm_id in order
    with pytest.raises(SymileFileError, match="label_hadm_id"):
        extract_teacher_features(root, teachers(weights), ["test", "test_uni"], progress=False)


# ------------------------------------------------------------------------------------------ benchmark


def test_benchmark_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    load_script("benchmark_teachers").main([
        "--config", "demo_small", "--records", "4", "--batch-size", "2", "--rss-records", "24",
        "--rss-check-records", "0", "--workdir", str(tmp_path / "work"), "--json", str(out),
    ])
    result = json.loads(out.read_text())
    for key in ("ecg_per_s", "peak_rss_mb", "preprocess_s", "network_s", "preprocess_ecg_per_s",
                "network_ecg_per_s"):
        assert result[key] > 0, key
    assert ((result["config"], result["batch_size"], result["records"], result["rss_records"])
            == ("demo_small", 2, 4, 24))
    assert "Peak RSS" in capsys.readouterr().out
    assert os.path.isdir(tmp_path / "work") and not (tmp_path / "work" / "rss").exists()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_ecg_file_is_not_left_mapped(root, weights):
    """Each batch maps, copies and unmaps: a mapping kept open would count every page read as RSS."""
    ecg = root / "train" / "ecg_train.npy"
    teacher = Teacher(TEACHERS["ecg"], load_ecgfounder(weights["ecg"], "demo_small"))
    assert teacher.features({"ecg": ecg}, 3, 8).shape == (5, ECG_DIM)
    assert str(ecg.resolve()) not in Path("/proc/self/maps").read_text()

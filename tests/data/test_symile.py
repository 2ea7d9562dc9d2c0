"""Symile-MIMIC: the synthetic release writer, the file table and its validation, and the DataModule."""

import json
import pickle
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.signal import find_peaks
from torch.utils.data import SequentialSampler
from torchvision.transforms.v2 import functional as TF

from pacx.data.resumable import ResumableSampler
from pacx.data.symile import CXR_TRANSFORMS, ITEMS, SymileDataset, SymileMIMICDataModule
from pacx.data.symile_files import (
    ECG_SAMPLING_HZ,
    FEATURE_SPLITS,
    FILES,
    SYMILE_LABS,
    SymileFileError,
    ValidationCache,
    first_bad_row,
    validate_split,
)
from pacx.lit.ecg_ssl import ECGSSLModule
from pacx.lit.labs_dae import LabsDAEModule
from pacx.lit.pacx import PaCXModule
from pacx.teachers import TEACHERS
from pacx.testing.symile import ecg_beat_model, minmax_scale, write_symile_release

N_TRAIN, N_VAL, N_TEST, N_CAND, CXR = 24, 12, 10, 10, 32

EXPECTED_FILES = {
    "train": {"cxr_train.npy", "ecg_train.npy", "labs_percentiles_train.npy", "labs_missingness_train.npy",
              "hadm_id_train.npy", "ecg_features.npy", "labs_features.npy"},
    "val": {"cxr_val.npy", "ecg_val.npy", "labs_percentiles_val.npy", "labs_missingness_val.npy",
            "hadm_id_val.npy", "ecg_features.npy", "labs_features.npy"},
    "val_retrieval": {"cxr_val_retrieval.npy", "ecg_val_retrieval.npy", "labs_percentiles_val_retrieval.npy",
                      "labs_missingness_val_retrieval.npy", "hadm_id_val_retrieval.npy",
                      "label_val_retrieval.npy", "label_hadm_id_val_retrieval.npy"},
    "test": {"cxr_test.npy", "ecg_test.npy", "labs_percentiles_test.npy", "labs_missingness_test.npy",
             "hadm_id_test.npy", "label_test.npy", "label_hadm_id_test.npy", "ecg_features.npy",
             "labs_features.npy"},
    "test_uni": {"cxr_test_uni.npy", "ecg_features.npy", "labs_features.npy", "hadm_id_test.npy"},
}
ROWS = {"train": N_TRAIN, "val": N_VAL, "val_retrieval": N_VAL * N_CAND, "test": N_TEST * N_CAND,
        "test_uni": N_TEST}


@pytest.fixture(scope="module")
def symile_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("symile") / "data_npy"
    return write_symile_release(out, n_train=N_TRAIN, n_val=N_VAL, n_test_queries=N_TEST, n_candidates=N_CAND,
                                cxr_size=CXR, seed=0, write_teacher_features=True)


@pytest.fixture(autouse=True)
def _fresh_validation_memory():
    ValidationCache.forget_all()
    yield
    ValidationCache.forget_all()


def load(root, split, name):
    return np.load(root / split / name)


# ------------------------------------------------------------------------------------------ writer


def test_writer_names_shapes_dtypes(symile_root):
    assert {p.name for p in symile_root.iterdir()} == set(EXPECTED_FILES) | {"labs_means.json"}
    for split, names in EXPECTED_FILES.items():
        assert {p.name for p in (symile_root / split).iterdir()} == names
    expected = {  # trailing shape, dtype
        "cxr": ((3, CXR, CXR), "float32"), "ecg": ((1, 5000, 12), "float32"),
        "labs_percentiles": ((50,), "float32"), "labs_missingness": ((50,), "int64"),
        "hadm_id": ((), "int64"), "label": ((), "int64"), "label_hadm_id": ((), "int64"),
        "ecg_features": ((1024,), "float32"), "labs_features": ((256,), "float32"),
    }
    for split in EXPECTED_FILES:
        for spec in FILES:
            if split in spec.splits:
                arr = np.load(symile_root / split / spec.filename(split), mmap_mode="r")
                assert arr.shape == (ROWS[split], *expected[spec.key][0]), (split, spec.key)
                assert arr.dtype.name == expected[spec.key][1], (split, spec.key)
    for split in FEATURE_SPLITS:  # the teacher feature files, named by the teacher registry
        for name in ("ecg", "labs"):
            spec = TEACHERS[name].feature_spec
            arr = np.load(symile_root / split / spec.filename(split), mmap_mode="r")
            assert (arr.shape, arr.dtype.name) == ((ROWS[split], *expected[spec.key][0]),
                                                   expected[spec.key][1])
    for item in ITEMS:  # the writer's tree passes validation wherever the split holds the item's files
        for split in EXPECTED_FILES:
            if all(split in spec.splits for spec in FILES if spec.items and item in spec.items):
                assert len(validate_split(symile_root, split, item)) >= 2


def test_writer_is_deterministic(tmp_path):
    kw = dict(n_train=10, n_val=10, n_test_queries=10, cxr_size=8, seed=3)
    a, b = write_symile_release(tmp_path / "a", **kw), write_symile_release(tmp_path / "b", **kw)
    for name in ("test/ecg_test.npy", "test/hadm_id_test.npy",
                 "val_retrieval/label_hadm_id_val_retrieval.npy", "train/labs_percentiles_train.npy",
                 "train/cxr_train.npy"):
        np.testing.assert_array_equal(np.load(a / name), np.load(b / name))
    assert (a / "labs_means.json").read_text() == (b / "labs_means.json").read_text()


@pytest.mark.parametrize("split, source, n", [("test", "test", N_TEST), ("val_retrieval", "val", N_VAL)])
def test_retrieval_layout(symile_root, split, source, n):
    label = load(symile_root, split, f"label_{split}.npy")
    hadm = load(symile_root, split, f"hadm_id_{split}.npy")
    label_hadm = load(symile_root, split, f"label_hadm_id_{split}.npy")
    ecg = np.load(symile_root / split / f"ecg_{split}.npy", mmap_mode="r")
    assert (label[:n] == 1).all() and (label[n:] == 0).all()  # all positives first
    np.testing.assert_array_equal(label_hadm[:n], hadm[:n])
    queries = hadm[:n]
    np.testing.assert_array_equal(label_hadm[n:], np.repeat(queries, N_CAND - 1))  # 9 per query, query order
    for q in range(n):
        negatives = hadm[n + q * (N_CAND - 1): n + (q + 1) * (N_CAND - 1)]
        assert len(set(negatives)) == N_CAND - 1 and set(negatives) <= set(queries) - {queries[q]}
    # A negative row is the whole row of another admission of the split.
    row = n + 4
    src = int(np.flatnonzero(queries == hadm[row])[0])
    np.testing.assert_array_equal(ecg[row], ecg[src])
    np.testing.assert_array_equal(hadm[:n], load(symile_root, source, f"hadm_id_{source}.npy")[:n])
    if split == "val_retrieval":
        np.testing.assert_array_equal(ecg[:n], load(symile_root, "val", "ecg_val.npy"))
    uni = load(symile_root, "test_uni", "hadm_id_test.npy")
    np.testing.assert_array_equal(uni, load(symile_root, "test", "label_hadm_id_test.npy")[:N_TEST])


def test_labs_missingness_and_means(symile_root):
    means = json.loads((symile_root / "labs_means.json").read_text())
    assert list(means) == sorted(means) == [f"{itemid}_percentile" for itemid, _ in SYMILE_LABS]
    mean = np.array(list(means.values()), dtype=np.float32)
    pct = np.concatenate([load(symile_root, s, f"labs_percentiles_{s}.npy")
                          for s in ("train", "val", "test")])
    obs = np.concatenate([load(symile_root, s, f"labs_missingness_{s}.npy")
                          for s in ("train", "val", "test")])
    assert set(np.unique(obs)) == {0, 1} and 0.6 < obs.mean() < 0.8 and (obs.sum(axis=1) >= 1).all()
    assert ((pct >= 0) & (pct <= 1)).all()
    np.testing.assert_allclose(pct[obs == 0], np.broadcast_to(mean, pct.shape)[obs == 0])
    train_pct, train_obs = pct[:N_TRAIN], obs[:N_TRAIN].astype(bool)
    observed_means = np.nanmean(np.where(train_obs, train_pct, np.nan), axis=0)
    np.testing.assert_allclose(mean, observed_means, rtol=1e-5)


@pytest.mark.parametrize("heart_rate", [50.0, 75.0, 110.0])
def test_synthetic_ecg_has_the_requested_heart_rate(heart_rate):
    ecg = minmax_scale(ecg_beat_model(np.random.default_rng(1), heart_rate=heart_rate))
    lead_ii = ecg[:, 1]
    peaks, _ = find_peaks(lead_ii, prominence=0.5 * np.ptp(lead_ii), distance=int(0.25 * ECG_SAMPLING_HZ))
    rate = 60.0 * ECG_SAMPLING_HZ / np.median(np.diff(peaks))
    assert abs(rate - heart_rate) / heart_rate < 0.04, (rate, heart_rate)
    assert abs(len(peaks) - heart_rate / 6) <= 2  # beats in 10 s
    assert np.corrcoef(lead_ii[:-1], lead_ii[1:])[0, 1] > 0.9  # smooth waveform, not white noise


def test_stored_ecg_spans_exactly_minus_one_to_one(symile_root):
    ecg = load(symile_root, "train", "ecg_train.npy")
    assert (ecg.min(axis=(1, 2, 3)) == -1).all() and (ecg.max(axis=(1, 2, 3)) == 1).all()
    assert not np.allclose(ecg[0], ecg[1])


# ------------------------------------------------------------------------------------------ DataModule

# item kind -> [(trailing shape, dtype)] of each batch element (dict items: in
# key order, nested dicts flattened)
ITEM_SHAPES = {
    "labs": [((50,), torch.float32), ((50,), torch.float32)],
    "labs_raw": [((50,), torch.float32), ((50,), torch.float32), ((), torch.int64)],
    "ecg": [((1, 5000, 12), torch.float32), ((), torch.int64)],
    "cxr": [((3, 224, 224), torch.float32), ((), torch.int64)],
    "cxr_teachers": [((3, 224, 224), torch.float32), ((1024,), torch.float32), ((256,), torch.float32)],
    "cxr_raw_teachers": [((3, 224, 224), torch.float32), ((1, 5000, 12), torch.float32),
                         ((50,), torch.float32), ((50,), torch.int64)],  # raw teacher inputs as stored
}


def flat(batch) -> list[torch.Tensor]:
    """A batch's (or item's) elements in order: tuples as they are, dicts in key
    order, nested ones flattened."""
    if not isinstance(batch, (dict, tuple, list)):
        return [batch]
    parts = batch.values() if isinstance(batch, dict) else batch
    return [t for part in parts for t in flat(part)]


def test_every_item_kind_is_covered():
    assert set(ITEM_SHAPES) == set(ITEMS)


@pytest.mark.parametrize("item", sorted(ITEMS))
def test_datamodule_serves_item_kind(symile_root, item):
    dm = SymileMIMICDataModule(str(symile_root), item, batch_size=4, num_workers=0, train_transform="resize",
                               pin_memory=False)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train.sampler, ResumableSampler) and train.sampler.shuffle and train.drop_last
    assert isinstance(val.sampler, SequentialSampler) and not val.drop_last
    assert len(dm.datasets["train"]) == N_TRAIN and len(dm.datasets["val"]) == N_VAL
    batch = flat(next(iter(val)))
    assert len(batch) == len(ITEM_SHAPES[item])
    for x, (shape, dtype) in zip(batch, ITEM_SHAPES[item]):
        assert tuple(x.shape) == (4, *shape) and x.dtype == dtype
    first = flat(dm.datasets["val"][0])
    if item in ("cxr", "cxr_teachers"):  # only the resize, no re-normalisation
        row = torch.from_numpy(load(symile_root, "val", "cxr_val.npy")[0])
        torch.testing.assert_close(first[0], TF.resize(row, [224, 224], antialias=True))
    if item == "labs":  # int64 missingness arrives as float32
        np.testing.assert_array_equal(first[1].numpy(),
                                      load(symile_root, "val", "labs_missingness_val.npy")[0])
    if item == "cxr_teachers":
        np.testing.assert_array_equal(first[1].numpy(), load(symile_root, "val", "ecg_features.npy")[0])


def test_test_uni_and_predict_loaders(symile_root):
    dm = SymileMIMICDataModule(str(symile_root), "cxr_teachers", batch_size=5, num_workers=0,
                               train_split=None, val_split=None, test_split="test_uni", pin_memory=False)
    dm.setup("test")
    assert len(dm.datasets["test"]) == N_TEST and dm.val_dataloader() == []
    queries = load(symile_root, "test", "label_hadm_id_test.npy")[:N_TEST]
    np.testing.assert_array_equal(dm.datasets["test"].hadm_ids, queries)
    ecg = SymileMIMICDataModule(str(symile_root), "ecg", batch_size=7, num_workers=0, train_split=None,
                                val_split=None, predict_split="test", pin_memory=False)
    ecg.setup("predict")
    indices = torch.cat([b[1] for b in ecg.predict_dataloader()])
    assert indices.tolist() == list(range(N_TEST * N_CAND))  # file order, nothing dropped


def test_per_device_batch_and_divisibility(symile_root):
    dm = SymileMIMICDataModule(str(symile_root), "labs", batch_size=8, num_workers=0, pin_memory=False)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)
    dm.setup("fit")
    assert dm.per_device_batch == 4 and dm.train_dataloader().batch_size == 4
    assert dm.train_dataloader().sampler.num_replicas == 2
    odd = SymileMIMICDataModule(str(symile_root), "labs", batch_size=10, num_workers=0)
    odd.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ValueError, match="global batch 10 does not divide by world size 4"):
        odd.setup("fit")


def test_evaluation_rows_once_per_rank_unless_the_module_gathers(symile_root):
    """Under DDP a module whose evaluation steps run no collectives (the Labs DAE) reads each validation row
    exactly once over the ranks; modules that gather (Stage 2, the ECG teacher) keep Lightning's padding
    sampler, which needs as many steps on every rank (the loader here is plain; Lightning adds it)."""
    seen = []
    for rank in range(5):  # 12 validation rows over 5 ranks: 3 + 3 + 2 + 2 + 2
        dm = SymileMIMICDataModule(str(symile_root), "labs", batch_size=10, num_workers=0, pin_memory=False)
        dm.trainer = SimpleNamespace(world_size=5, global_rank=rank, lightning_module=LabsDAEModule)
        dm.setup("fit")
        seen.append(list(dm.val_dataloader().sampler))
    assert [len(s) for s in seen] == [3, 3, 2, 2, 2] and sorted(sum(seen, [])) == list(range(N_VAL))
    for module in (ECGSSLModule, PaCXModule):
        dm = SymileMIMICDataModule(str(symile_root), "labs", batch_size=10, num_workers=0, pin_memory=False)
        dm.trainer = SimpleNamespace(world_size=5, global_rank=0, lightning_module=module)
        dm.setup("fit")
        assert isinstance(dm.val_dataloader().sampler, SequentialSampler), module


def test_dataset_pickles_without_arrays(symile_root):
    ds = SymileDataset(symile_root, "train", "ecg")
    ds[0]
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # memory maps are reopened in the worker, not copied
    torch.testing.assert_close(pickle.loads(blob)[3][0], ds[3][0])


def test_unknown_names_and_unset_transform(symile_root):
    with pytest.raises(KeyError, match="unknown Symile-MIMIC item kind 'ekg'"):
        SymileMIMICDataModule(str(symile_root), "ekg")
    dm = SymileMIMICDataModule(str(symile_root), "cxr_teachers", num_workers=0)
    registered = sorted(CXR_TRANSFORMS)
    with pytest.raises(ValueError, match=re.escape(f"train_transform is not set; registered: {registered}")):
        dm.setup("fit")
    bad = SymileMIMICDataModule(str(symile_root), "cxr", num_workers=0, train_transform="robust")
    with pytest.raises(KeyError,
                       match=re.escape(f"unknown CXR transform 'robust'; registered: {registered}")):
        bad.setup("fit")
    with pytest.raises(SymileFileError,
                       match="needs ecg_features.npy, which split 'val_retrieval' does not have"):
        SymileDataset(symile_root, "val_retrieval", "cxr_teachers")
    with pytest.raises(KeyError, match="unknown teacher 'ekg'"):
        SymileMIMICDataModule(str(symile_root), "cxr_teachers", serve_teachers=["ekg"])
    with pytest.raises(KeyError, match="unknown Symile-MIMIC split 'valid'"):
        validate_split(symile_root, "valid", "labs")


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def train_copy(symile_root, tmp_path):
    """A writable copy of the train split only."""
    shutil.copytree(symile_root / "train", tmp_path / "train")
    return tmp_path


def setup_train(root, item):
    dm = SymileMIMICDataModule(str(root), item, batch_size=4, num_workers=0, val_split=None,
                               train_transform="resize", pin_memory=False)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("shape, got", [((N_TRAIN, 12, 5000), "[24, 12, 5000]"),
                                        ((N_TRAIN, 1, 2500, 12), "[24, 1, 2500, 12]")])
def test_wrong_ecg_layout_names_file_and_shapes(train_copy, shape, got):
    np.save(train_copy / "train" / "ecg_train.npy", np.zeros(shape, np.float32))
    expected = rf"ecg_train\.npy: expected shape \[N, 1, 5000, 12\], got {re.escape(got)}"
    with pytest.raises(SymileFileError, match=expected):
        setup_train(train_copy, "ecg")


def test_mismatched_n_names_both_files(train_copy):
    path = train_copy / "train" / "labs_missingness_train.npy"
    np.save(path, np.load(path)[:-1])
    expected = r"labs_missingness_train\.npy has N=23 but .*hadm_id_train\.npy has N=24"
    with pytest.raises(SymileFileError, match=expected):
        setup_train(train_copy, "labs")


def test_nan_in_labs_names_file_and_row(train_copy):
    path = train_copy / "train" / "labs_percentiles_train.npy"
    pct = np.load(path)
    pct[17, 3] = np.nan
    np.save(path, pct)
    with pytest.raises(SymileFileError, match=r"labs_percentiles_train\.npy: row 17 has NaN or inf"):
        setup_train(train_copy, "labs")


@pytest.mark.parametrize("name, value, what",
                         [("labs_missingness_train.npy", 2, "a value other than 0 and 1"),
                           ("labs_percentiles_train.npy", 1.5, r"a value outside \[0, 1\]")])
def test_out_of_range_labs(train_copy, name, value, what):
    path = train_copy / "train" / name
    arr = np.load(path)
    arr[5, 0] = value
    np.save(path, arr)
    with pytest.raises(SymileFileError, match=rf"{name}: row 5 has {what}"):
        setup_train(train_copy, "labs")


def test_missing_file_is_named(train_copy):
    (train_copy / "train" / "labs_features.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing Symile-MIMIC file: .*train/labs_features\.npy"):
        setup_train(train_copy, "cxr_teachers")
    setup_train(train_copy, "ecg")  # other item kinds do not need it


def test_wrong_dtype_is_named(train_copy):
    path = train_copy / "train" / "cxr_train.npy"
    np.save(path, np.load(path).astype(np.float64))
    expected = r"cxr_train\.npy: dtype float64 not allowed; expected one of \['float32'\]"
    with pytest.raises(SymileFileError, match=expected):
        setup_train(train_copy, "cxr")


def test_chunked_scan_finds_first_bad_row():
    arr = np.zeros((100, 3, 4), np.float32)
    arr[61, 2, 1] = np.inf
    arr[40, 0, 0] = np.nan
    for chunk_bytes in (1, 48 * 7, 1 << 20):  # one row, 7 rows, everything per step
        assert first_bad_row(arr, ("finite",), chunk_bytes) == (40, "NaN or inf")
    both = np.full((10, 2), 0.5)
    both[6, 0], both[3, 1] = np.nan, 2.0
    assert first_bad_row(both, ("finite", "unit_interval"), 16 * 2) == (3, "a value outside [0, 1]")


def test_validation_cache_skips_rescans_until_file_changes(train_copy, monkeypatch):
    import pacx.data.symile_files as sf

    scans = []
    real = sf.first_bad_row
    def counting(arr, checks, chunk):
        scans.append(checks)
        return real(arr, checks, chunk)

    monkeypatch.setattr(sf, "first_bad_row", counting)
    cache_file = train_copy / "validated.json"
    validate_split(train_copy, "train", "labs", cache=ValidationCache(cache_file))
    assert len(scans) == 2 and len(json.loads(cache_file.read_text())) == 2
    ValidationCache.forget_all()
    validate_split(train_copy, "train", "labs", cache=ValidationCache(cache_file))  # from the JSON file
    validate_split(train_copy, "train", "labs")  # from process memory
    assert len(scans) == 2
    path = train_copy / "train" / "labs_percentiles_train.npy"
    pct = np.load(path)
    pct[2, 2] = np.nan
    np.save(path, pct)
    with pytest.raises(SymileFileError, match="row 2 has NaN"):
        validate_split(train_copy, "train", "labs", cache=ValidationCache(cache_file))


def test_teacher_widths_follow_the_files_and_must_agree_across_splits(symile_root, tmp_path):
    import shutil

    root = tmp_path / "data_npy"
    shutil.copytree(symile_root, root)
    for split in ("train", "val"):
        n = len(np.load(root / split / "ecg_features.npy", mmap_mode="r"))
        np.save(root / split / "ecg_features.npy", np.zeros((n, 128), np.float32))
    dm = SymileMIMICDataModule(str(root), "cxr_teachers", batch_size=4, num_workers=0,
                               train_transform="resize", img_size=32, pin_memory=False)
    dm.setup("fit")
    widths = dm.feature_widths()
    assert widths["ecg"][0] == 128 and widths["labs"][0] == 256
    assert next(iter(dm.train_dataloader()))["teachers"]["ecg"].shape == (4, 128)
    n = len(np.load(root / "val" / "ecg_features.npy", mmap_mode="r"))
    np.save(root / "val" / "ecg_features.npy", np.zeros((n, 64), np.float32))
    other = SymileMIMICDataModule(str(root), "cxr_teachers", batch_size=4, num_workers=0,
                                  train_transform="resize", img_size=32, pin_memory=False)
    with pytest.raises(ValueError,
                       match=r"val/ecg_features\.npy holds 64-wide .*/train/ecg_features\.npy holds 128"):
        other.setup("fit")

"""Benchmark registry and the classification converters: synthetic release -> manifests."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pandas as pd
import pytest

import pacx.data.converters.classification as cls
import pacx.data.converters.medmod as medmod
from pacx.data.manifest import ManifestError
from pacx.data.prepare import CONVERTERS
from pacx.data.registry import BENCHMARKS, INDEX_COLUMN, SPLITS, BenchmarkSpec, get_benchmark
from pacx.testing.benchmarks import RELEASE_WRITERS

CLASSIFICATION = sorted(n for n, s in BENCHMARKS.items() if s.task != "segmentation")
# MedMod needs a decision on Symile's training admissions (tests/data/test_leakage.py covers it); these
# synthetic releases share no ids with any Symile release.
OPTIONS = {name: {"allow_overlap": True} for name in ("medmod_phys", "medmod_mort")}


def ceil_share(n: int, share: float) -> int:
    return math.ceil(share * n)


def two_step(n: int, test: float, val: float) -> dict[str, int]:
    n_test = ceil_share(n, test)
    n_val = ceil_share(n - n_test, val)
    return {"train": n - n_test - n_val, "val": n_val, "test": n_test}


# Two-step stratified recipes (test share of all, then val share of the rest) and their label column.
TWO_STEP = {
    "chexchonet": (0.2, 0.1, "composite_slvh_dlv"),
    "tb": (0.2, 0.15, "Label"),
    "covidx": (0.2, 0.1, "Label"),
    "pneumonia": (0.2, 0.1, "Pneumonia"),
    "medmod_phys": (0.2, 0.1 / 0.8, "Other upper respiratory disease"),
    "medmod_mort": (0.2, 0.1 / 0.8, "Other upper respiratory disease"),
}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """One synthetic release per writer (benchmarks sharing a release share the files)."""
    cache: dict = {}

    def get(name: str):
        writer = RELEASE_WRITERS[name]
        if writer not in cache:
            cache[writer] = writer(tmp_path_factory.mktemp(writer.__name__) / "raw", 0)
        return cache[writer]

    return get


@pytest.fixture(scope="module")
def converted(releases, tmp_path_factory):
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"out_{name}")
            summary = CONVERTERS[name].fn(releases(name), out, **OPTIONS.get(name, {}))
            spec = get_benchmark(name)
            frames = {s: pd.read_csv(out / spec.manifest_files[s]) for s in SPLITS}
            cache[name] = (summary, frames, out)
        return cache[name]

    return get


# ---------------------------------------------------------------- registry


def test_registry_names_and_paper_set():
    assert set(BENCHMARKS) == {
        "chexchonet", "chexchonet_echo", "vindr", "medmod_phys", "medmod_mort", "cxlseg", "covidqu_seg",
        "covidqu", "tb", "chestx6", "nih", "qata", "covidx", "pneumonia",
    }
    assert sum(s.in_paper for s in BENCHMARKS.values()) == 9
    assert all(name == name.lower() == spec.name for name, spec in BENCHMARKS.items())


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_spec_is_complete(name):
    spec = BENCHMARKS[name]
    assert set(spec.image_dirs) == set(spec.manifest_files) == set(SPLITS)
    assert len(set(spec.manifest_files.values())) == 3
    expected = 1 if spec.task in ("binary", "segmentation") else len(spec.labels)
    assert spec.num_outputs == expected
    assert len(set(spec.labels)) == len(spec.labels)
    if spec.task == "segmentation":
        assert (spec.path_column, spec.mask_column, spec.metric) == ("img_path", "mask_path", "iou")
        assert dict(spec.image_dirs) == dict.fromkeys(SPLITS, "")
        assert dict(spec.manifest_files) == {s: f"{s}.csv" for s in SPLITS}
    else:
        assert spec.mask_column is None
    assert hash(spec) == hash(name) and spec == BENCHMARKS[name]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"  # type: ignore[misc]


def test_get_benchmark_lists_known_names():
    assert get_benchmark("NIH") is BENCHMARKS["nih"]
    with pytest.raises(KeyError, match="unknown benchmark 'nope'.*chexchonet"):
        get_benchmark("nope")


def test_spec_validation():
    base = dict(name="x", task="binary", labels=("y",), path_column="Path", mask_column=None,
                image_dirs=dict.fromkeys(SPLITS, ""), manifest_files={s: f"{s}.csv" for s in SPLITS},
                metric="auroc", label_source="columns", description="", in_paper=False)
    BenchmarkSpec(**base)
    with pytest.raises(ValueError, match="image_dirs"):
        BenchmarkSpec(**{**base, "image_dirs": {"train": ""}})
    with pytest.raises(ValueError, match="task"):
        BenchmarkSpec(**{**base, "task": "regression"})
    with pytest.raises(ValueError, match="mask_column"):
        BenchmarkSpec(**{**base, "mask_column": "mask_path"})


# ---------------------------------------------------------------- converters


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_converter_registered_from_spec(name):
    spec, conv = BENCHMARKS[name], CONVERTERS[name]
    assert (conv.task, conv.metric, conv.description) == (spec.task, spec.metric, spec.description)
    assert name in RELEASE_WRITERS


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_manifests_columns_labels_and_images(name, releases, converted):
    spec = BENCHMARKS[name]
    summary, frames, out = converted(name)
    raw = releases(name)
    seen: set[str] = set()
    for split in SPLITS:
        df = frames[split]
        assert (out / spec.manifest_files[split]).is_file()
        assert {spec.path_column, *spec.label_columns} <= set(df.columns)
        assert len(df) > 0 and summary[split]["rows"] == len(df)
        labels = df[list(spec.label_columns)].to_numpy()
        if spec.label_source == "index":
            assert set(np.unique(labels)) <= set(range(len(spec.labels)))
        else:
            assert set(np.unique(labels)) <= {0, 1}
        if spec.label_source == "onehot":
            assert (labels.sum(axis=1) == 1).all()
        paths = df[spec.path_column].astype(str)
        assert all((raw / spec.image_dirs[split] / p).is_file() for p in paths), split
        assert not seen & set(paths), f"{split} shares images with an earlier split"
        seen |= set(paths)
    # Every label (class) has a positive in train.
    assert all(v > 0 for v in summary["train"]["positives"].values())


@pytest.mark.parametrize("name", sorted(TWO_STEP))
def test_two_step_stratified_sizes(name, converted):
    test_share, val_share, strat = TWO_STEP[name]
    _, frames, _ = converted(name)
    n = sum(len(f) for f in frames.values())
    assert {s: len(frames[s]) for s in SPLITS} == two_step(n, test_share, val_share)
    share = sum(frames[s][strat].sum() for s in SPLITS) / n
    for split in SPLITS:
        assert abs(frames[split][strat].sum() - share * len(frames[split])) <= 1


def test_official_and_random_split_sizes(releases, converted):
    sizes = {name: {s: len(converted(name)[1][s]) for s in SPLITS}
             for name in ("vindr", "chestx6", "covidqu", "nih")}
    vindr_train = pd.read_csv(releases("vindr") / "annotations/image_labels_train.csv")["image_id"].nunique()
    assert sizes["vindr"]["val"] == ceil_share(vindr_train, 0.1)
    assert sizes["vindr"]["train"] + sizes["vindr"]["val"] == vindr_train and sizes["vindr"]["test"] == 12
    assert sizes["chestx6"] == {"train": 24, "val": 12, "test": 12}
    assert sizes["covidqu"] == {"train": 18, "val": 6, "test": 9}
    raw = releases("nih")
    test_list = (raw / "test_list.txt").read_text().split()
    train_val = (raw / "train_val_list.txt").read_text().split()
    assert sizes["nih"] == {"train": len(train_val) - ceil_share(len(train_val), 0.15),
                            "val": ceil_share(len(train_val), 0.15), "test": len(test_list)}


def test_nih_respects_official_test_list(releases, converted):
    _, frames, _ = converted("nih")
    raw = releases("nih")
    assert set(frames["test"]["Image Index"]) == set((raw / "test_list.txt").read_text().split())
    test_patients = set(frames["test"]["Patient ID"])
    assert not test_patients & (set(frames["train"]["Patient ID"]) | set(frames["val"]["Patient ID"]))
    entry = pd.read_csv(raw / "Data_Entry_2017.csv").set_index("Image Index")
    row = frames["train"].iloc[0]
    assert sorted(lab for lab in BENCHMARKS["nih"].labels if row[lab]) == sorted(
        f for f in entry.loc[row["Image Index"], "Finding Labels"].split("|") if f != "No Finding")


def test_echo_split_is_patient_level(converted):
    summary, frames, _ = converted("chexchonet_echo")
    patients = {s: set(frames[s]["patient_id"]) for s in SPLITS}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    n_patients = sum(len(p) for p in patients.values())
    n_held = ceil_share(n_patients, 0.2)
    assert (len(patients["test"]), len(patients["val"])) == (ceil_share(n_held, 0.5),
                                                             n_held - ceil_share(n_held, 0.5))
    assert (frames["val"]["split"] == "val").all() and "cxr_path" in frames["val"].columns
    assert summary["test"]["patients"] == len(patients["test"])


def test_chestx6_onehot_matches_folder(converted):
    _, frames, _ = converted("chestx6")
    df = frames["test"]
    classes = list(BENCHMARKS["chestx6"].labels)
    assert (df["Path"].str.split("/").str[1] == df[classes].idxmax(axis=1)).all()
    assert df["Path"].str.startswith("test/").all()


def test_chestx6_leaves_out_files_that_are_not_images_and_says_so(releases, tmp_path, caplog):
    """A stray .DS_Store in a class folder is no manifest row (it would fail at load); the warning names
    it."""
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(releases("chestx6"), raw)
    folder = next(p for p in raw.rglob("*") if p.is_dir() and p.parent.name == "train")
    (folder / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="pacx.data.converters.classification"):
        CONVERTERS["chestx6"].fn(raw, tmp_path / "out")
    train = pd.read_csv(tmp_path / "out" / get_benchmark("chestx6").manifest_files["train"])
    assert len(train) == 24 and not train["Path"].str.contains("DS_Store").any()
    assert f"{folder}: 1 file(s) that are not images left out: .DS_Store" in caplog.text


def test_covidqu_label_order(releases, converted):
    _, frames, _ = converted("covidqu")
    df = frames["train"]
    normal = df.loc[df["Path"].str.startswith("Normal"), INDEX_COLUMN]
    covid = df.loc[df["Path"].str.startswith("covid_"), INDEX_COLUMN]
    assert set(normal) == {0} and set(covid) == {1}


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_converters_are_deterministic(name, releases, converted, tmp_path):
    spec = BENCHMARKS[name]
    _, _, out = converted(name)
    CONVERTERS[name].fn(releases(name), tmp_path, seed=42, **OPTIONS.get(name, {}))
    for split in SPLITS:
        assert ((tmp_path / spec.manifest_files[split]).read_bytes()
                == (out / spec.manifest_files[split]).read_bytes())


def test_seed_changes_random_split(releases, tmp_path):
    a = CONVERTERS["tb"].fn(releases("tb"), tmp_path / "a", seed=42)
    b = CONVERTERS["tb"].fn(releases("tb"), tmp_path / "b", seed=7)
    assert a["test"]["rows"] == b["test"]["rows"]
    assert not pd.read_csv(tmp_path / "a/tb_test_split.csv").equals(
        pd.read_csv(tmp_path / "b/tb_test_split.csv"))


def test_vindr_majority_vote_by_hand():
    df = pd.DataFrame({
        "image_id": ["a", "a", "a", "b", "b", "b"],
        "rad_id": ["R1", "R2", "R3", "R4", "R5", "R6"],
        "Nodule/Mass": [1, 1, 0, 1, 0, 0],
        "ILD": [0, 0, 0, 1, 1, 1],
    })
    voted = cls.vindr_majority_vote(df, ["Nodule/Mass", "ILD"])
    assert voted.to_dict("list") == {"image_id": ["a", "b"], "Nodule/Mass": [1, 0], "ILD": [0, 1]}


def test_vindr_manifests_use_spec_labels(releases, converted):
    _, frames, _ = converted("vindr")
    labels = list(BENCHMARKS["vindr"].labels)
    for split in SPLITS:
        assert list(frames[split].columns) == ["image_id", *labels]
        assert frames[split]["image_id"].str.endswith(".png").all()
    raw = pd.read_csv(releases("vindr") / "annotations/image_labels_train.csv")
    image = frames["train"]["image_id"].iloc[0].removesuffix(".png")
    reads = raw[raw["image_id"] == image]
    assert frames["train"].iloc[0]["Cardiomegaly"] == int(reads["Cardiomegaly"].sum() >= 2)


MISSING = [
    ("chexchonet", "metadata.csv", "composite_slvh_dlv"),
    ("vindr", "annotations/image_labels_train.csv", "Cardiomegaly"),
    ("vindr", "annotations/image_labels_test.csv", "Pleural effusion"),
    ("medmod_phys", "medmod_final.csv", "Shock"),
    ("tb", "shenzhen_metadata.csv", "findings"),
    ("nih", "Data_Entry_2017.csv", "Finding Labels"),
]


@pytest.mark.parametrize(("name", "rel", "column"), MISSING)
def test_missing_column_names_file_and_column(name, rel, column, releases, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    src = releases(name)
    for f in src.rglob("*"):
        if f.is_file() and f.suffix in {".csv", ".txt"}:
            (raw / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, raw / f.relative_to(src))
    pd.read_csv(raw / rel).drop(columns=[column]).to_csv(raw / rel, index=False)
    with pytest.raises(ManifestError,
                       match=rf"{rel.split('/')[-1]}.*missing required column\(s\) \[.{column}.\]"):
        CONVERTERS[name].fn(raw, tmp_path / "out", **OPTIONS.get(name, {}))


def test_missing_release_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        CONVERTERS["chexchonet"].fn(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------- MedMod stay -> CXR linking


def test_link_stays_to_earliest_unused_cxr():
    stays = pd.DataFrame({
        "subject_id": [11000001, 11000001, 11000002, 12000003],
        "intime": ["2150-01-02", "2150-01-02", "2150-03-01", "2150-05-01"],
        "outtime": ["2150-01-04"] * 2 + ["2150-03-02", "2150-05-02"],
        "admittime": ["2150-01-01", "2150-01-01", "2150-03-01", "2150-05-01"],
        "dischtime": ["2150-01-06", "2150-01-06", "2150-03-02", "2150-05-02"],
    })
    meta = pd.DataFrame({
        "dicom_id": ["late", "early", "outside", "other"],
        "subject_id": [11000001, 11000001, 11000001, 11000002],
        "study_id": [2, 1, 3, 4],
        "StudyDate": [20150105, 20150101, 20141231, 20150301],
        "StudyTime": [101010.5, 90000.0, 120000.0, 5.0],
    }).assign(StudyDate=lambda d: d["StudyDate"] + 1350000)  # 2150...
    linked = medmod.link_stays_to_cxr(stays, meta)
    # The first stay takes the earliest image in its window (from admittime), the second the next one;
    # the image outside [min(in, admit), max(out, disch)] and the subject without images never match.
    assert linked["cxr_path"].tolist() == [
        "p11/p11000001/s1/early.jpg", "p11/p11000001/s2/late.jpg", "p11/p11000002/s4/other.jpg"]


def test_medmod_from_pipeline_outputs(tmp_path):
    from pacx.testing.benchmarks import write_medmod_pipeline

    raw = write_medmod_pipeline(tmp_path / "raw", 0)
    summary = CONVERTERS["medmod_phys"].fn(raw, tmp_path / "out", allow_overlap=True)
    final = pd.read_csv(tmp_path / "out/medmod_final.csv")
    assert len(final) == 40 and list(final.columns)[:3] == ["subject_id", "hadm_id", "stay_id"]
    assert list(final.columns)[-1] == "cxr_path" and len(final.columns) == 39
    assert final["cxr_path"].is_unique and all((raw / p).is_file() for p in final["cxr_path"])
    assert sum(summary[s]["rows"] for s in SPLITS) == 40
    np.save(tmp_path / "hadm_id_train.npy", final["hadm_id"].to_numpy()[:4])
    CONVERTERS["medmod_mort"].fn(raw, tmp_path / "out2", exclude_hadm=str(tmp_path / "hadm_id_train.npy"))
    assert len(pd.read_csv(tmp_path / "out2/medmod_final.csv")) == 36
    assert summary["leakage"] == {"allow_overlap": True}


# ---------------------------------------------------------------- malformed releases


def _copy_metadata(src, raw):
    """The release's CSV / TXT files (not its images) copied to ``raw``."""
    import shutil

    for f in src.rglob("*"):
        if f.is_file() and f.suffix in {".csv", ".txt"}:
            (raw / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, raw / f.relative_to(src))
    return raw


BLANK = [
    ("tb", "shenzhen_metadata.csv", "findings", 3),
    ("chexchonet", "metadata.csv", "composite_slvh_dlv", 5),
    ("chexchonet_echo", "metadata.csv", "patient_id", 4),
    ("nih", "Data_Entry_2017.csv", "Finding Labels", 2),
    ("vindr", "annotations/image_labels_train.csv", "Cardiomegaly", 7),
    ("vindr", "annotations/image_labels_test.csv", "Pleural effusion", 1),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("name", "rel", "column", "row"), BLANK)
def test_blank_release_cell_names_file_row_and_column(name, rel, column, row, releases, tmp_path):
    """Blank cell in a release column a converter reads (TB findings, a CheXchoNet label or patient id, NIH
    Finding Labels, a VinDr label) → ManifestError naming the file, the row with its line, and the column
    (never a blank read as TB-positive, a row dropped from the patient split, or a bare TypeError)."""
    raw = _copy_metadata(releases(name), tmp_path / "raw")
    df = pd.read_csv(raw / rel)
    df.loc[row, column] = None
    df.to_csv(raw / rel, index=False)
    with pytest.raises(ManifestError, match=rf"{rel.split('/')[-1]}: 1 blank cell\(s\).*row {row} "
                                            rf"\(line {row + 2}\): \[.{column}.\]"):
        CONVERTERS[name].fn(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.csv"))


@pytest.mark.bad_input
def test_pneumonia_missing_class_folder_is_named(releases, tmp_path):
    """Pediatric pneumonia release without one of its class folders (val/PNEUMONIA) → FileNotFoundError
    naming the folder (its images are not silently left out of the pooled split)."""
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(releases("pneumonia"), raw)
    folder = raw / "chest_xray/chest_xray/val/PNEUMONIA"
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError, match=rf"pneumonia: missing folder {folder}"):
        CONVERTERS["pneumonia"].fn(raw, tmp_path / "out")


@pytest.mark.bad_input
def test_nih_unknown_finding_names_rows(releases, tmp_path):
    """NIH Finding Labels with a name outside the 14 labels and "No Finding" (e.g. "Pleural Thickening")
    → ManifestError naming Data_Entry_2017.csv, the name and the row (not a silent all-zero row)."""
    raw = _copy_metadata(releases("nih"), tmp_path / "raw")
    entry = pd.read_csv(raw / "Data_Entry_2017.csv")
    entry.loc[6, "Finding Labels"] = "Effusion|Pleural Thickening"
    entry.to_csv(raw / "Data_Entry_2017.csv", index=False)
    with pytest.raises(ManifestError, match=r"Data_Entry_2017\.csv: 1 row\(s\) with finding\(s\) outside .*"
                                            r"\['Pleural Thickening'\].*row 6 \(line 8\)"):
        CONVERTERS["nih"].fn(raw, tmp_path / "out")


@pytest.mark.bad_input
def test_nih_lists_sharing_an_image_is_an_error(releases, tmp_path):
    """An image in both train_val_list.txt and test_list.txt → ManifestError naming both lists and the
    image (it would be trained and tested on)."""
    raw = _copy_metadata(releases("nih"), tmp_path / "raw")
    shared = (raw / "test_list.txt").read_text().split()[0]
    with open(raw / "train_val_list.txt", "a") as f:
        f.write(shared + "\n")
    with pytest.raises(ManifestError, match=rf"train_val_list\.txt and .*test_list\.txt share 1 image\(s\).*"
                                            rf"{shared}"):
        CONVERTERS["nih"].fn(raw, tmp_path / "out")


@pytest.mark.bad_input
@pytest.mark.parametrize("n_fields", [2, 5])
def test_covidx_malformed_line_names_file_and_line(n_fields, releases, tmp_path):
    """COVIDx list line without exactly 4 space-separated fields → ManifestError naming the file and the
    line (not a bare pandas ParserError, nor a row with a blank label read as negative)."""
    raw = _copy_metadata(releases("covidx"), tmp_path / "raw")
    lines = (raw / "val.txt").read_text().splitlines()
    fields = lines[2].split()
    lines[2] = " ".join((fields + ["extra"])[:n_fields])
    (raw / "val.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=rf"val\.txt: line 3: expected 4 space-separated fields.*"
                                            rf"found {n_fields}"):
        CONVERTERS["covidx"].fn(raw, tmp_path / "out")


def test_covidx_parsing_matches_the_lists(releases, converted):
    """Every official line becomes one row: patient id, file, 1 for "positive", source."""
    _, frames, _ = converted("covidx")
    rows = pd.concat(frames.values()).astype({"Patient ID": str}).set_index("Path")
    raw = releases("covidx")
    lines = [line.split() for f in ("train.txt", "val.txt", "test.txt")
             for line in (raw / f).read_text().splitlines() if line.strip()]
    assert len(rows) == len(lines)
    for pid, path, label, source in lines:
        assert (rows.at[path, "Patient ID"], rows.at[path, "Label"], rows.at[path, "Data Source"]) == (
            pid, int(label == "positive"), source)


def test_chexchonet_splits_match_an_independent_recipe(releases, converted):
    """Variant A: images split test 20 %, then val 10 % of the rest, stratified; ECHO: patients (string ids,
    as in the release; label = max composite) split 80/20, the 20 % halved into val then test; seed 42."""
    from sklearn.model_selection import train_test_split

    meta = pd.read_csv(releases("chexchonet") / "metadata.csv")
    assert meta["patient_id"].map(type).eq(str).all()
    rest, test = train_test_split(meta, test_size=0.2, random_state=42, stratify=meta["composite_slvh_dlv"])
    train, val = train_test_split(rest, test_size=0.1, random_state=42, stratify=rest["composite_slvh_dlv"])
    _, frames, _ = converted("chexchonet")
    for split, df in {"train": train, "val": val, "test": test}.items():
        assert frames[split]["cxr_filename"].tolist() == df["cxr_filename"].tolist()
    patients = meta.groupby("patient_id")["composite_slvh_dlv"].max()
    tr, tmp, _, y_tmp = train_test_split(patients.index.to_numpy(), patients.to_numpy(), test_size=0.2,
                                         stratify=patients.to_numpy(), random_state=42)
    va, te = train_test_split(tmp, test_size=0.5, stratify=y_tmp, random_state=42)
    _, echo, _ = converted("chexchonet_echo")
    for split, ids in {"train": tr, "val": va, "test": te}.items():
        assert set(echo[split]["patient_id"]) == set(ids)
        assert echo[split]["cxr_filename"].tolist() == meta.loc[meta["patient_id"].isin(ids),
                                                                 "cxr_filename"].tolist()

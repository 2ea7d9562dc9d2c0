"""Leakage between Stage 2's Symile-MIMIC admissions and MedMod: the id file is never unpickled, MedMod needs
an exclusion decision, check-overlap counts planted overlaps (and none for the paper plan's MedMod), and a
Stage 2 run's admissions travel to its export and stop Stage 3 on an overlapping test split."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pacx.data.converters.medmod import OverlapPolicyError, prepare_medmod_phys
from pacx.data.leakage import (
    LeakageError,
    check_stage3_overlap,
    ids_sha256,
    load_id_file,
    manifest_ids,
    stage2_admissions,
    write_admissions,
)
from pacx.data.registry import BENCHMARKS
from pacx.testing.benchmarks import write_medmod_pipeline
from pacx.testing.symile import write_symile_release
from tests.helpers import PAPER_STAGE2, load_script, stage2_args

REPO = Path(__file__).resolve().parents[2]
PLANTED_TRAIN = 20000000 + np.arange(0, 40, 5)  # MedMod admissions (20000000 + stay) planted in Symile train
PLANTED_VAL = 20000001  # one more, planted in Symile val
TEST_CSV = BENCHMARKS["medmod_phys"].manifest_files["test"]


class Payload:
    """Unpickling it creates ``marker``: proof that code in a crafted file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """A synthetic MedMod pipeline release and a Symile-MIMIC release (data_npy + train.csv / val.csv) whose
    train split holds 8 MedMod admissions and whose val split one more, plus the patient of another stay."""
    base = tmp_path_factory.mktemp("pair")
    medmod = write_medmod_pipeline(base / "medmod", 0)
    data_npy = write_symile_release(base / "symile" / "data_npy", n_train=32, n_val=16, n_test_queries=10,
                                    cxr_size=40, write_teacher_features=True)
    ids = {}
    for split, planted in (("train", PLANTED_TRAIN), ("val", np.array([PLANTED_VAL]))):
        path = data_npy / split / f"hadm_id_{split}.npy"
        hadm = np.load(path)
        hadm[:len(planted)] = planted
        np.save(path, hadm)
        subjects = 90000000 + np.arange(len(hadm))
        subjects[:len(planted)] = 10000000 + 7 * (planted - 20000000)  # the stays' own patients
        ids[split] = (subjects, hadm)
    ids["val"][0][-1] = 10000000 + 7 * 3  # stay 3's patient, under another admission
    for split, (subjects, hadm) in ids.items():
        pd.DataFrame({"subject_id": subjects, "hadm_id": hadm}).to_csv(base / "symile" / f"{split}.csv",
                                                                       index=False)
    return {"medmod": medmod, "symile": base / "symile", "data_npy": data_npy}


def prepare(*argv: str) -> int:
    return load_script("prepare").main([str(a) for a in argv])


@pytest.mark.bad_input
def test_a_crafted_pickle_id_file_is_refused_and_never_runs(tmp_path, pair, caplog):
    """A crafted pickle .npy as --exclude-hadm → LeakageError naming the file; nothing in it runs

    The payload would create a marker file when unpickled; it never appears."""
    marker = tmp_path / "ran"
    evil = tmp_path / "hadm_id_train.npy"
    np.save(evil, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(LeakageError,
                       match=rf"{re.escape(str(evil))}: refused, it holds pickled Python objects"):
        load_id_file(evil)
    assert prepare("medmod_phys", "--raw", pair["medmod"], "--out", tmp_path / "out", "--exclude-hadm",
                   evil) == 2
    assert "refused" in caplog.text and not marker.exists()
    np.save(tmp_path / "floats.npy", np.zeros(3))
    with pytest.raises(LeakageError, match="1-D integer array"):
        load_id_file(tmp_path / "floats.npy")


@pytest.mark.bad_input
def test_medmod_needs_exclude_hadm_or_allow_overlap(tmp_path, pair, caplog):
    """MedMod built without --exclude-hadm or --allow-overlap → OverlapPolicyError naming --exclude-hadm

    --allow-overlap is loud and recorded in prepare.json; --exclude-hadm records
    the ids' hash and the count."""
    with pytest.raises(OverlapPolicyError,
                       match="needs --exclude-hadm .*hadm_id_train.npy.*or --allow-overlap"):
        prepare_medmod_phys(pair["medmod"], tmp_path / "a")
    assert prepare("medmod_phys", "--raw", pair["medmod"], "--out", tmp_path / "b") == 2
    assert "--exclude-hadm" in caplog.text and not (tmp_path / "b" / TEST_CSV).exists()
    train_ids = pair["data_npy"] / "train" / "hadm_id_train.npy"
    with pytest.raises(OverlapPolicyError, match="not both"):
        prepare_medmod_phys(pair["medmod"], tmp_path / "c", exclude_hadm=str(train_ids), allow_overlap=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert prepare("medmod_phys", "--raw", pair["medmod"], "--out", tmp_path / "d",
                       "--allow-overlap") == 0
    assert "MEDMOD_PHYS: --allow-overlap" in caplog.text
    sidecar = json.loads((tmp_path / "d" / "prepare.json").read_text())
    assert sidecar["summary"]["leakage"] == {"allow_overlap": True}
    assert prepare("medmod_phys", "--raw", pair["medmod"], "--out", tmp_path / "e", "--exclude-hadm",
                   train_ids) == 0
    leakage = json.loads((tmp_path / "e" / "prepare.json").read_text())["summary"]["leakage"]
    assert leakage["allow_overlap"] is False and leakage["stays_dropped"] == len(PLANTED_TRAIN)
    assert leakage["exclude_hadm_sha256"] == ids_sha256({"hadm_id": np.load(train_ids)})
    final = pd.read_csv(tmp_path / "e" / "medmod_final.csv")
    assert not final["hadm_id"].isin(PLANTED_TRAIN).any() and final["hadm_id"].isin([PLANTED_VAL]).any()


def test_check_overlap_counts_a_planted_overlap(tmp_path, pair, capsys):
    manifests = tmp_path / "manifests"
    assert prepare("medmod_phys", "--raw", pair["medmod"], "--out", manifests / "medmod_phys",
                   "--allow-overlap") == 0
    assert prepare("tb", "--raw", load_script_release("tb", tmp_path), "--out", manifests / "tb") == 0
    test = pd.read_csv(manifests / "medmod_phys" / TEST_CSV)
    expected = {"admissions_train": int(test["hadm_id"].isin(PLANTED_TRAIN).sum()),
                "admissions_val": int((test["hadm_id"] == PLANTED_VAL).sum()),
                "patients_train": int(test["hadm_id"].isin(PLANTED_TRAIN).sum()),
                "patients_val": int(test["hadm_id"].isin([PLANTED_VAL, 20000003]).sum())}
    assert expected["admissions_train"] > 0  # the planted overlap reached the test split
    capsys.readouterr()
    assert prepare("check-overlap", "--symile", pair["symile"], "--manifests", manifests,
                   "--json", tmp_path / "overlap.json") == 1
    report = {e["benchmark"]: e for e in json.loads((tmp_path / "overlap.json").read_text())}
    assert {k: report["medmod_phys"][k] for k in expected} == expected
    assert (report["medmod_phys"]["rows"] == len(test)
            and report["medmod_phys"]["ids"] == ["hadm_id", "subject_id"])
    assert report["tb"]["ids"] == []  # no MIMIC ids: listed, not counted
    out = capsys.readouterr().out
    assert (re.search(rf"medmod_phys\s+{len(test)}\s+{expected['admissions_train']}\s", out)
            and "no MIMIC ids" in out)
    # data_npy alone: admissions only (the patients need the release CSVs beside it)
    alone = tmp_path / "alone" / "data_npy"
    shutil.copytree(pair["data_npy"], alone)
    assert prepare("check-overlap", "--symile", alone, "--manifests", manifests / "medmod_phys",
                   "--json", tmp_path / "npy_only.json") == 1
    entry = json.loads((tmp_path / "npy_only.json").read_text())[0]
    assert entry["admissions_train"] == expected["admissions_train"] and entry["patients_train"] is None


def load_script_release(name: str, tmp_path: Path) -> Path:
    from pacx.testing.benchmarks import RELEASE_WRITERS

    return RELEASE_WRITERS[name](tmp_path / f"raw_{name}", 0)


def test_the_paper_plans_medmod_has_no_overlap(tmp_path, pair):
    """The plan's own converter command for MedMod (with --exclude-hadm), run on the synthetic pair."""
    from pacx.reproduce.plan import load_plan

    plan = load_plan(REPO / "plans/paper.yaml", out=tmp_path / "out",
                     overrides={"medmod": str(pair["medmod"]), "symile": str(pair["data_npy"])})
    point = next(p for p in plan.nodes["manifests"].points if p.values["benchmark"] == "medmod_phys")
    assert point.argv[0] == "scripts/prepare.py" and "--exclude-hadm" in point.argv
    assert prepare(*point.argv[1:]) == 0
    assert prepare("check-overlap", "--symile", pair["symile"], "--manifests", tmp_path / "out/manifests",
                   "--json", tmp_path / "overlap.json") == 0
    entry = json.loads((tmp_path / "overlap.json").read_text())[0]
    assert (entry["benchmark"] == "medmod_phys" and entry["admissions_train"] == 0
            and entry["patients_train"] == 0)


def test_manifest_ids_from_columns_or_mimic_cxr_paths():
    df = pd.DataFrame({"img_path": ["p10/p10000032/s50414267/a.jpg", "files/p11/p11000011/s1/b.jpg"],
                       "mask_path": ["x", "y"]})
    assert (manifest_ids(df)["subject_id"].tolist() == [10000032, 11000011]
            and "hadm_id" not in manifest_ids(df))
    assert manifest_ids(pd.DataFrame({"Path": ["CHNCXR_0001_0.png"]})) == {}
    ids = manifest_ids(pd.DataFrame({"hadm_id": [1, None], "subject_id": [5, 6],
                                     "cxr_path": ["p10/p7/s1/a.jpg"] * 2}))
    assert ids["hadm_id"].tolist() == [1, -1] and ids["subject_id"].tolist() == [5, 6]


@pytest.mark.bad_input
def test_stage3_guard_against_a_recorded_run(tmp_path, caplog):
    """Stage 3 test split sharing admissions with the backbone's Stage 2
    training split → LeakageError naming the count

    --allow_overlap true evaluates with a warning and the counts as results-row
    fields; an altered record is refused."""
    run = tmp_path / "stage2"
    ids = {"train_hadm_id": np.array([1, 2, 3]), "val_hadm_id": np.array([4]),
           "train_subject_id": np.array([7])}
    sha = write_admissions(run / "stage2_admissions.npz", ids)
    (run / "run.json").write_text(json.dumps({"stage2_admissions": {"file": "stage2_admissions.npz",
                                                                    "sha256": sha}}))
    manifest = tmp_path / "test.csv"
    pd.DataFrame({"hadm_id": [1, 2, 4, 9], "subject_id": [7, 8, 8, 8]}).to_csv(manifest, index=False)
    with pytest.raises(LeakageError,
                       match=r"2 of 4 test rows of .*test\.csv share an admission .*--allow_overlap"):
        check_stage3_overlap("pacx", str(run), manifest)
    with caplog.at_level(logging.WARNING):
        fields = check_stage3_overlap("pacx", str(run / "checkpoints" / "last.ckpt"), manifest, allow=True)
    assert fields == {"stage2_overlap_check": "checked", "stage2_overlap_train": 2, "stage2_overlap_val": 1,
                      "stage2_overlap_patients": 1, "allow_overlap": True}
    assert "evaluating anyway" in caplog.text and "validation split" in caplog.text
    clean = tmp_path / "clean.csv"
    pd.DataFrame({"Path": ["a.png"]}).to_csv(clean, index=False)
    assert check_stage3_overlap("pacx", str(run), clean) == {}  # no MIMIC ids: nothing to check
    assert check_stage3_overlap("mae", str(tmp_path), manifest) == {}  # no Stage 2 record behind it
    assert check_stage3_overlap("pacx", str(tmp_path), manifest)["stage2_overlap_check"] == "unchecked"
    write_admissions(run / "stage2_admissions.npz", {**ids, "train_hadm_id": np.array([9])})  # replaced
    with pytest.raises(LeakageError, match="the file was replaced"):
        stage2_admissions(run)


def test_stage2_records_admissions_and_stage3_refuses_an_overlapping_medmod(tmp_path, pair, stage1_run):
    """Stage 2 (2 steps) on the planted Symile → run.json + npz → export with its sidecar → Stage 3 with the
    PaCX export on MedMod: built with --allow-overlap it stops naming the count (or records it with
    --allow_overlap true); built with the exclusion it runs, with 0 recorded."""
    from pacx.share import export_encoder
    from Stage2_PACX import main as stage2
    from Stage3_eval import main as stage3
    from tests.lit.test_classify import stage3_args

    run = tmp_path / "stage2"
    stage2(stage2_args(run, pair["data_npy"], stage1_run, "--trainer.max_steps", "2", *PAPER_STAGE2))
    record = json.loads((run / "run.json").read_text())["stage2_admissions"]
    ids, _ = stage2_admissions(run)
    assert record["file"] == "stage2_admissions.npz" and record["sha256"] == ids_sha256(ids)
    assert set(PLANTED_TRAIN) <= set(ids["train_hadm_id"]) and set(ids) == {
        "train_hadm_id", "val_hadm_id", "train_subject_id", "val_subject_id"}
    export = export_encoder(run, tmp_path / "exports" / "pacx_encoder.safetensors")
    assert (tmp_path / "exports" / "pacx_encoder.stage2_admissions.npz").is_file()
    assert stage2_admissions(export)[1].endswith("pacx_encoder.stage2_admissions.npz")

    train_ids = pair["data_npy"] / "train" / "hadm_id_train.npy"
    for name, flag in (("leaky", ["--allow-overlap"]), ("clean", ["--exclude-hadm", train_ids])):
        assert prepare("medmod_phys", "--raw", pair["medmod"], "--out", tmp_path / name, *flag) == 0
    test = pd.read_csv(tmp_path / "leaky" / TEST_CSV)
    n = int(test["hadm_id"].isin(PLANTED_TRAIN).sum())

    def args(manifests: str, *extra: str) -> list[str]:
        return stage3_args("medmod_phys", pair["medmod"], tmp_path / manifests,
                           tmp_path / f"s3_{manifests}{len(extra)}", export, "--model.backbone.kind", "pacx",
                           *extra)

    with pytest.raises(LeakageError, match=rf"{n} of {len(test)} test rows .* share an admission"):
        stage3(args("leaky"))
    stage3(args("leaky", "--allow_overlap", "true"))
    row = pd.read_csv(tmp_path / "s3_leaky2" / "results.csv").iloc[0]
    assert row["stage2_overlap_train"] == n and bool(row["allow_overlap"])
    stage3(args("clean"))
    row = pd.read_csv(tmp_path / "s3_clean0" / "results.csv").iloc[0]
    assert row["stage2_overlap_check"] == "checked" and row["stage2_overlap_train"] == 0

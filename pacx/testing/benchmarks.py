"""Tiny synthetic releases of the classification benchmarks, in the layouts their converters read.

``write_<name>(out, seed) -> raw root`` writes the official metadata files with a few dozen rows, plus 32x32
grey images where the registry spec expects them, deterministically for a seed; ``RELEASE_WRITERS`` maps
benchmark names to writers. ``write_chexchonet`` and ``write_tb`` also take ``content`` from a caller (the
physiology phantom). Details: docs/design.md#test-releases.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pacx.data.registry import (
    CHESTX6_CLASSES,
    ECHO_LABELS,
    MEDMOD_MORTALITY,
    MEDMOD_PHENOTYPES,
    NIH_LABELS,
    SPLITS,
)
from pacx.testing.images import simple_cxr

SIZE = 32

VINDR_ALL_LABELS = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
    "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding",
]
CHEXCHONET_COLUMNS = [
    "patient_id", "cxr_filename", "cxr_time_offset", "cxr_year", "cxr_path", "cxr_pixel_spacing_x",
    "cxr_pixel_spacing_y", "age", "sex", "ivsd", "lvpwd", "lvidd", "slvh", "dlv", "composite_slvh_dlv",
    "heart_transplant", "lung_transplant", "pacemaker_or_icd",
]
MEDMOD_META = ["subject_id", "hadm_id", "stay_id", "intime", "outtime", "admittime", "dischtime", "deathtime",
               "anchor_age", "dod"]


def save_image(path: Path, rng: np.random.Generator, *copies: Path, image: np.ndarray | None = None) -> None:
    """A grayscale image at ``path`` (format from the suffix), and byte copies at ``copies``.

    The pixels are ``image`` (uint8 [H, W]) when given, else a 32x32 ``simple_cxr`` drawn from ``rng``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = simple_cxr(rng, SIZE, SIZE) if image is None else image
    Image.fromarray(pixels, mode="L").save(path)
    for copy in copies:
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())


def _balanced(rng: np.random.Generator, n: int, share: float) -> np.ndarray:
    """Exactly round(n * share) ones in random order (keeps every stratified split feasible)."""
    y = np.zeros(n, dtype=int)
    y[: max(2, round(n * share))] = 1
    return rng.permutation(y)


def write_chexchonet(out: Path, seed: int = 0, n_patients: int = 30,
                     content: Iterable[dict] | None = None) -> Path:
    """``metadata.csv`` (all release columns) and ``images/<cxr_filename>`` (the renamed ``cxrs/``).

    As in the release, ``patient_id`` is a 32-hex-digit string and ``cxr_filename`` is
    ``<patient_id>_<8 hex digits>.jpg`` (both derived from ``seed``, not drawn from the rng).
    ``content``: per CXR a dict of release columns and ``image``; ``cxr_filename`` / ``cxr_path`` are set
    here.
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    if content is not None:
        rows = []
        for item in content:
            name = f"{len(rows) + 1:06d}.jpg"
            rows.append({**{k: v for k, v in item.items() if k != "image"}, "cxr_filename": name,
                         "cxr_path": f"./cxrs/{name}"})
            save_image(out / "images" / name, rng, image=item["image"])
        pd.DataFrame(rows, columns=CHEXCHONET_COLUMNS).to_csv(out / "metadata.csv", index=False)
        return out
    patient_y = _balanced(rng, n_patients, 0.4)
    rows = []
    for p in range(n_patients):
        patient = hashlib.md5(f"chexchonet-{seed}-{p}".encode()).hexdigest()
        for k in range(int(rng.integers(1, 4))):
            name = f"{patient}_{hashlib.md5(f'{patient}-{k}'.encode()).hexdigest()[:8]}.jpg"
            positive = patient_y[p] and k == 0
            slvh, dlv = (int(rng.random() < 0.7), int(rng.random() < 0.7)) if positive else (0, 0)
            if patient_y[p] and k == 0 and not (slvh or dlv):
                slvh = 1
            if patient_y[p] and k > 0:
                slvh, dlv = int(rng.random() < 0.5), int(rng.random() < 0.5)
            rows.append({
                "patient_id": patient, "cxr_filename": name, "cxr_time_offset": int(rng.integers(-300, 300)),
                "cxr_year": int(rng.integers(2013, 2019)), "cxr_path": f"./cxrs/{name}",
                "cxr_pixel_spacing_x": 0.139, "cxr_pixel_spacing_y": 0.139, "age": int(rng.integers(20, 90)),
                "sex": rng.choice(["M", "F"]), "ivsd": round(float(rng.uniform(0.6, 1.6)), 2),
                "lvpwd": round(float(rng.uniform(0.6, 1.6)), 2),
                "lvidd": round(float(rng.uniform(3.5, 7)), 2),
                "slvh": slvh, "dlv": dlv, "composite_slvh_dlv": int(slvh or dlv),
                **{c: int(rng.random() < 0.3) for c in ECHO_LABELS[2:]},
            })
            save_image(out / "images" / name, rng)
    pd.DataFrame(rows, columns=CHEXCHONET_COLUMNS).to_csv(out / "metadata.csv", index=False)
    return out


def write_vindr(out: Path, seed: int = 0, n_train: int = 40, n_test: int = 12) -> Path:
    """``annotations/image_labels_{train,test}.csv`` (3 reader rows per train image, one test row with
    "Other disease") and ``train/ test/<image_id>.png``."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = [], []
    for split, n in (("train", n_train), ("test", n_test)):
        for _ in range(n):
            image_id = rng.bytes(16).hex()
            truth = (rng.random(len(VINDR_ALL_LABELS) - 1) < 0.35).astype(int)
            if split == "train":
                for r in range(3):
                    noisy = np.where(rng.random(truth.size) < 0.15, 1 - truth, truth)
                    train_rows.append([image_id, f"R{r + 1}", *noisy, int(not noisy.any())])
            else:
                test_rows.append([image_id, *truth, int(not truth.any())])
            save_image(out / split / f"{image_id}.png", rng)
    pd.DataFrame(train_rows, columns=["image_id", "rad_id", *VINDR_ALL_LABELS]).to_csv(
        out / "annotations/image_labels_train.csv", index=False)
    test_labels = [("Other disease" if c == "Other diseases" else c) for c in VINDR_ALL_LABELS]
    pd.DataFrame(test_rows, columns=["image_id", *test_labels]).to_csv(
        out / "annotations/image_labels_test.csv", index=False)
    return out


def write_medmod(out: Path, seed: int = 0, n_stays: int = 40) -> Path:
    """``medmod_final.csv`` (the MedMod pipeline output after CXR linking, 39 columns) and the linked
    JPGs at their MIMIC-CXR-JPG relative paths."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    rare = _balanced(rng, n_stays, 0.3)
    rows = []
    for i in range(n_stays):
        subject = 10000000 + int(rng.integers(0, n_stays // 2)) * 7
        intime = pd.Timestamp("2150-01-01") + pd.Timedelta(days=int(rng.integers(0, 3000)))
        died = int(rng.random() < 0.3)
        pheno = {c: int(rng.random() < 0.4) for c in MEDMOD_PHENOTYPES}
        pheno["Other upper respiratory disease"] = int(rare[i])
        study, dicom = 50000000 + i, rng.bytes(8).hex()
        cxr_path = f"p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg"
        rows.append({
            "subject_id": subject, "hadm_id": 20000000 + i, "stay_id": 30000000 + i,
            "intime": intime, "outtime": intime + pd.Timedelta(days=2),
            "admittime": intime - pd.Timedelta(hours=6),
            "dischtime": intime + pd.Timedelta(days=5),
            "deathtime": intime + pd.Timedelta(days=4) if died else None,
            "anchor_age": int(rng.integers(18, 91)),
            "dod": (intime + pd.Timedelta(days=4)).date() if died else None,
            "mortality_inunit": int(died and rng.random() < 0.5), "mortality": died,
            "mortality_inhospital": died, **pheno, "cxr_path": cxr_path,
        })
        save_image(out / cxr_path, rng)
    columns = [*MEDMOD_META, *MEDMOD_MORTALITY, *MEDMOD_PHENOTYPES, "cxr_path"]
    pd.DataFrame(rows, columns=columns).to_csv(out / "medmod_final.csv", index=False)
    return out


def write_medmod_pipeline(out: Path, seed: int = 0, n_stays: int = 44) -> Path:
    """The MedMod pipeline outputs ``all_stays.csv`` + row-aligned ``phenotype_labels.csv`` and MIMIC-CXR's
    ``mimic-cxr-2.0.0-metadata.csv`` (the input of the stay -> CXR linking), with every listed JPG.

    Each stay's subject has one image inside the admission window, some a second later one inside it and
    one outside it; every 11th stay has no image in its window (dropped by the linking).
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    rare = _balanced(rng, n_stays, 0.3)
    stays, phenos, meta = [], [], []

    def add_image(subject: int, when: pd.Timestamp) -> None:
        study, dicom = 50000000 + len(meta), rng.bytes(8).hex()
        meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                     "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                     "ViewPosition": rng.choice(["PA", "AP"]),
                     "Rows": 3056, "Columns": 2544, "StudyDate": int(when.strftime("%Y%m%d")),
                     "StudyTime": float(when.strftime("%H%M%S")) + 0.5})
        save_image(out / f"p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg", rng)

    for i in range(n_stays):
        subject = 10000000 + i * 7
        admit = pd.Timestamp("2150-01-01 08:00") + pd.Timedelta(days=int(rng.integers(0, 3000)))
        intime, outtime = admit + pd.Timedelta(hours=6), admit + pd.Timedelta(days=2)
        disch = admit + pd.Timedelta(days=5)
        died = int(rng.random() < 0.3)
        stays.append({
            "subject_id": subject, "hadm_id": 20000000 + i, "stay_id": 30000000 + i, "last_careunit": "MICU",
            "intime": intime, "outtime": outtime, "los": 1.75, "admittime": admit, "dischtime": disch,
            "deathtime": disch if died else None, "race": "WHITE", "gender": rng.choice(["M", "F"]),
            "anchor_age": int(rng.integers(18, 91)), "dod": disch.date() if died else None, "age": 60,
            "mortality_inunit": 0, "mortality": died, "mortality_inhospital": died,
        })
        phenos.append({**{c: int(rng.random() < 0.4) for c in MEDMOD_PHENOTYPES},
                       "Other upper respiratory disease": int(rare[i])})
        add_image(subject, admit - pd.Timedelta(days=30))  # outside the window
        if i % 11 != 10:
            add_image(subject, admit + pd.Timedelta(hours=2))  # earliest in window (before intime)
            if i % 3 == 0:
                add_image(subject, admit + pd.Timedelta(days=1))
    pd.DataFrame(stays).to_csv(out / "all_stays.csv", index=False)
    pd.DataFrame(phenos, columns=list(MEDMOD_PHENOTYPES)).to_csv(out / "phenotype_labels.csv", index=False)
    pd.DataFrame(meta).to_csv(out / "mimic-cxr-2.0.0-metadata.csv", index=False)
    return out


def write_covidqu(out: Path, seed: int = 0, per_folder: tuple[int, int, int] = (6, 2, 3)) -> Path:
    """``Lung Segmentation Data/Lung Segmentation Data/<Split>/<Class>/images/*.png`` plus flat
    ``images/``."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    base = out / "Lung Segmentation Data" / "Lung Segmentation Data"
    prefix = {"COVID-19": "covid_", "Non-COVID": "non_COVID (", "Normal": "Normal ("}
    counter = dict.fromkeys(prefix, 0)
    for split, n in zip(("Train", "Val", "Test"), per_folder):
        for category, pre in prefix.items():
            for _ in range(n):
                counter[category] += 1
                name = f"{pre}{counter[category]}{')' if pre.endswith('(') else ''}.png"
                save_image(base / split / category / "images" / name, rng, out / "images" / name)
    return out


def write_tb(out: Path, seed: int = 0, n: int = 40, content: Iterable[dict] | None = None) -> Path:
    """``shenzhen_metadata.csv`` and ``images/images/CHNCXR_####_{0|1}.png`` (the Kaggle layout).

    ``content``: per image ``sex``, ``age``, ``findings`` ("normal" = negative) and ``image``.
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    rows = []
    if content is not None:
        for i, item in enumerate(content, start=1):
            name = f"CHNCXR_{i:04d}_{int(item['findings'] != 'normal')}.png"
            rows.append({"study_id": name, **{k: item[k] for k in ("sex", "age", "findings")}})
            save_image(out / "images" / "images" / name, rng, image=item["image"])
        pd.DataFrame(rows,
                     columns=["study_id", "sex", "age", "findings"]).to_csv(out / "shenzhen_metadata.csv",
                                                                            index=False)
        return out
    for i, tb in enumerate(_balanced(rng, n, 0.5), start=1):
        name = f"CHNCXR_{i:04d}_{tb}.png"
        rows.append({"study_id": name, "sex": rng.choice(["male", "female"]),
                     "age": f"{int(rng.integers(10, 80))}yrs",
                     "findings": rng.choice(["PTB in the left upper field", "STB,ATB",
                                             "1yr post TB"]) if tb else "normal"})
        save_image(out / "images" / "images" / name, rng)
    pd.DataFrame(rows, columns=["study_id", "sex", "age", "findings"]).to_csv(out / "shenzhen_metadata.csv",
                                                                              index=False)
    return out


def write_chestx6(out: Path, seed: int = 0, per_class: tuple[int, int, int] = (4, 2, 2)) -> Path:
    """``chest-xray/{train,val,test}/<class>/*.jpg`` (with some ``augmented_`` files); returns
    ``chest-xray``."""
    rng = np.random.default_rng(seed)
    root = Path(out) / "chest-xray"
    for split, n in zip(SPLITS, per_class):
        for cls in CHESTX6_CLASSES:
            for k in range(n):
                name = f"{'augmented_' if k % 3 == 2 else ''}{cls.lower()}_{split}_{k}.jpg"
                save_image(root / split / cls / name, rng)
    return root


def write_nih(out: Path, seed: int = 0, n_patients: int = 24) -> Path:
    """``Data_Entry_2017.csv``, patient-disjoint ``train_val_list.txt`` / ``test_list.txt``, flat
    ``images/``."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    rows, train_val, test = [], [], []
    for p in range(1, n_patients + 1):
        for follow in range(int(rng.integers(1, 4))):
            name = f"{p:08d}_{follow:03d}.png"
            # Every finding recurs every 14 images (and a few "No Finding" rows), so each has train positives.
            i = len(rows)
            labels = [] if i % 5 == 4 else sorted({NIH_LABELS[i % 14], NIH_LABELS[(3 * i + 5) % 14]})
            rows.append({
                "Image Index": name, "Finding Labels": "|".join(labels) or "No Finding",
                "Follow-up #": follow,
                "Patient ID": p, "Patient Age": int(rng.integers(1, 90)),
                "Patient Gender": rng.choice(["M", "F"]),
                "View Position": rng.choice(["PA", "AP"]), "OriginalImage[Width": 2500, "Height]": 2048,
                "OriginalImagePixelSpacing[x": 0.143, "y]": 0.143,
            })
            (test if p % 4 == 0 else train_val).append(name)
            save_image(out / "images" / name, rng)
    pd.DataFrame(rows).to_csv(out / "Data_Entry_2017.csv", index=False)
    (out / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (out / "test_list.txt").write_text("\n".join(test) + "\n")
    return out


def write_covidx(out: Path, seed: int = 0, sizes: tuple[int, int, int] = (30, 8, 8)) -> Path:
    """Header-less, space-separated ``train.txt`` / ``val.txt`` / ``test.txt`` and flat ``images/``."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    for name, n in zip(("train.txt", "val.txt", "test.txt"), sizes):
        lines = []
        for positive in _balanced(rng, n, 0.75):
            image = f"{rng.bytes(6).hex()}.png"
            source = rng.choice(["cohen", "rsna", "bimcv", "sirm"])
            lines.append(f"{int(rng.integers(1, 10**6))} {image} "
                         f"{'positive' if positive else 'negative'} {source}")
            save_image(out / "images" / image, rng)
        (out / name).write_text("\n".join(lines) + "\n")
    return out


def write_pneumonia(out: Path, seed: int = 0, per_folder: tuple[int, int, int] = (12, 3, 6)) -> Path:
    """``chest_xray/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` plus flat ``images/``."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    base = out / "chest_xray" / "chest_xray"
    i = 0
    for split, n in zip(SPLITS, per_folder):
        for cls in ("NORMAL", "PNEUMONIA"):
            for _ in range(n if cls == "PNEUMONIA" else max(2, n // 2)):
                i += 1
                name = (f"IM-{i:04d}-0001.jpeg" if cls == "NORMAL"
                        else f"person{i}_{rng.choice(['bacteria', 'virus'])}_{i}.jpeg")
                save_image(base / split / cls / name, rng, out / "images" / name)
    return out


RELEASE_WRITERS: dict[str, Callable[[Path, int], Path]] = {
    "chexchonet": write_chexchonet,
    "chexchonet_echo": write_chexchonet,
    "vindr": write_vindr,
    "medmod_phys": write_medmod,
    "medmod_mort": write_medmod,
    "covidqu": write_covidqu,
    "tb": write_tb,
    "chestx6": write_chestx6,
    "nih": write_nih,
    "covidx": write_covidx,
    "pneumonia": write_pneumonia,
}

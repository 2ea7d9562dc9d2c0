"""The phantom's releases, one registry entry each, written through the existing layout writers.

``RELEASES``: ``chexpert`` (Stage 1), ``symile`` (Stage 2), ``chexchonet``, ``covidqu_seg`` and ``tb``
(Stage 3); each draws its own patients and returns a ground-truth table, which ``generate_phantom``
saves under ``truth/``. What each release holds and why: docs/design.md#phantom-releases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pacx.demo.phantom.cxr import CXRBatch, render_cxr, sample_cxr_params
from pacx.demo.phantom.latent import LATENT_NAMES, echo_labels, sample_latent
from pacx.demo.phantom.physio import NODULE_RATE, phantom_record
from pacx.testing.benchmarks import write_chexchonet, write_tb
from pacx.testing.chexpert import write_chexpert_release
from pacx.testing.seg_benchmarks import COVIDQU_PREFIXES, write_covidqu_seg_release
from pacx.testing.symile import write_symile_release

GEOMETRY_COLUMNS = ("silhouette_px", "thorax_px", "ctr", "lung_area_px")
SEG_SPLITS = ("Train", "Val", "Test")


@dataclass(frozen=True)
class PhantomSizes:
    """How much each release holds, and the CXR size in pixels (square)."""

    img_size: int
    chexpert_train: int
    chexpert_valid: int
    symile_train: int
    symile_val: int
    symile_test_queries: int
    symile_candidates: int
    chexchonet_patients: int
    covidqu_seg: tuple[int, int, int]  # Train / Val / Test images
    tb_images: int


def seed_of(seq: np.random.SeedSequence) -> int:
    """An int seed for a writer that takes one, derived from ``seq``."""
    return int(seq.generate_state(1)[0])


def draw_cxrs(rng: np.random.Generator, latent: np.ndarray, size: int,
              nodule: np.ndarray | float = NODULE_RATE) -> tuple[dict, CXRBatch]:
    params = sample_cxr_params(rng, latent, nodule=nodule)
    return params, render_cxr(params, size)


def truth_table(uid: np.ndarray, latent: np.ndarray, params: dict | None = None,
                batch: CXRBatch | None = None) -> pd.DataFrame:
    """Ground truth per row: phantom patient id, latent, and (for images) nodule, devices and geometry."""
    table = {"phantom_patient": uid, **{name: latent[:, i] for i, name in enumerate(LATENT_NAMES)}}
    if params is not None and batch is not None:
        table.update({k: params[k].astype(int) for k in ("nodule", "pacemaker", "sternal_wires")})
        table.update({k: batch.geometry[k] for k in GEOMETRY_COLUMNS})
    return pd.DataFrame(table)


def patient_ids(release: int, n: int) -> np.ndarray:
    """Phantom patient ids, unique across releases: ``release * 10**7 + k`` (``release``: 1-5)."""
    return release * 10**7 + np.arange(n)


class PreRendered:
    """An ``image_fn`` for ``write_chexpert_release`` that hands out pre-rendered images in call order
    (the writer's ``rng`` is not used: the pixels come from the phantom's own stream)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images, self.calls = images, 0

    def __call__(self, rng: np.random.Generator, width: int, height: int, frontal: bool = True) -> np.ndarray:
        image = self.images[self.calls]
        if image.shape != (height, width):
            raise ValueError(f"pre-rendered image is {image.shape}, the writer asks for {(height, width)}")
        self.calls += 1
        return image


def write_chexpert(out: Path, seq: np.random.SeedSequence, sizes: PhantomSizes) -> pd.DataFrame:
    rng = np.random.default_rng(seq)
    n = sizes.chexpert_train + sizes.chexpert_valid
    latent = sample_latent(rng, n)
    params, batch = draw_cxrs(rng, latent, sizes.img_size)
    write_chexpert_release(out, n_train=sizes.chexpert_train, n_valid=sizes.chexpert_valid, seed=seed_of(seq),
                           width=sizes.img_size, height=sizes.img_size, lateral_fraction=0.0,
                           image_fn=PreRendered(batch.images))
    paths = pd.concat([pd.read_csv(out / f"{split}.csv", usecols=["Path"]) for split in ("train", "valid")])
    return truth_table(patient_ids(1, n), latent, params, batch).assign(Path=paths["Path"].to_numpy())


def write_symile(out: Path, seq: np.random.SeedSequence, sizes: PhantomSizes) -> pd.DataFrame:
    rng = np.random.default_rng(seq)
    counts = {"train": sizes.symile_train, "val": sizes.symile_val, "test": sizes.symile_test_queries}
    latent = sample_latent(rng, sum(counts.values()))
    write_symile_release(out, n_train=counts["train"], n_val=counts["val"], n_test_queries=counts["test"],
                         n_candidates=sizes.symile_candidates, cxr_size=sizes.img_size, seed=seed_of(seq),
                         record_fn=phantom_record, latents=latent, fit_lab_percentiles=True,
                         write_test_uni=True)
    # Admissions are the leading rows of train, val and test, in the order of ``latent``.
    hadm = np.concatenate([np.load(out / s / f"hadm_id_{s}.npy")[:n] for s, n in counts.items()])
    split = np.repeat(list(counts), list(counts.values()))
    return truth_table(patient_ids(2, len(latent)), latent).assign(hadm_id=hadm, split=split)


def write_chexchonet_phantom(out: Path, seq: np.random.SeedSequence, sizes: PhantomSizes) -> pd.DataFrame:
    rng = np.random.default_rng(seq)
    n_patients = sizes.chexchonet_patients
    per_patient = rng.choice([1, 2, 3], size=n_patients, p=[0.5, 0.3, 0.2])
    patient = np.repeat(np.arange(n_patients), per_patient)  # [N images]
    latent = sample_latent(rng, n_patients)[patient]
    params, batch = draw_cxrs(rng, latent, sizes.img_size)
    transplant = rng.random((2, n_patients)) < [[0.03], [0.02]]  # heart, lung: rare and not drawn
    echo = echo_labels(rng, latent)
    age, sex = rng.integers(20, 91, n_patients), rng.choice(["M", "F"], n_patients)
    content = [{
        "patient_id": 1000 + int(p), "cxr_time_offset": int(rng.integers(-300, 300)),
        "cxr_year": int(rng.integers(2013, 2019)), "cxr_pixel_spacing_x": 0.139, "cxr_pixel_spacing_y": 0.139,
        "age": int(age[p]), "sex": sex[p], **{k: v[i] for k, v in echo.items()},
        "heart_transplant": int(transplant[0, p]), "lung_transplant": int(transplant[1, p]),
        "pacemaker_or_icd": int(params["pacemaker"][i]), "image": batch.images[i],
    } for i, p in enumerate(patient)]
    write_chexchonet(out, seed=seed_of(seq), content=content)
    names = pd.read_csv(out / "metadata.csv", usecols=["cxr_filename"])["cxr_filename"].to_numpy()
    return truth_table(patient_ids(3, n_patients)[patient], latent, params, batch).assign(
        cxr_filename=names, composite_slvh_dlv=echo["composite_slvh_dlv"])


def write_covidqu_seg_phantom(out: Path, seq: np.random.SeedSequence, sizes: PhantomSizes) -> pd.DataFrame:
    rng = np.random.default_rng(seq)
    n = sum(sizes.covidqu_seg)
    latent = sample_latent(rng, n)
    params, batch = draw_cxrs(rng, latent, sizes.img_size)
    split = np.repeat(SEG_SPLITS, sizes.covidqu_seg)
    abnormal = (params["nodule"] > 0) | (params["effusion"] > 0.02)
    category = np.where(abnormal, "Non-COVID", "Normal")
    content = {s: [{"category": category[i], "image": batch.images[i], "mask": batch.lungs[i]}
                   for i in np.flatnonzero(split == s)] for s in SEG_SPLITS}
    write_covidqu_seg_release(out, seed=seed_of(seq), content=content)
    # The writer numbers the files of each split/category folder 1, 2, ... in content order.
    k = pd.Series(1, index=range(n)).groupby([split, category]).cumsum().to_numpy()
    img_path = [f"{s}/{c}/images/{COVIDQU_PREFIXES[c]} ({j}).png" for s, c, j in zip(split, category, k)]
    return truth_table(patient_ids(4, n), latent, params, batch).assign(img_path=img_path)


def nodule_findings(params: dict) -> list[str]:
    """Shenzhen-style findings text: where the nodule is (patient's side; upper/middle/lower field)."""
    zone = np.digitize(params["nodule_y"], [-0.25, 0.1])
    texts = []
    for has, x, z in zip(params["nodule"], params["nodule_x"], zone):
        side = "left" if x > 0 else "right"  # +x = the patient's left
        texts.append(f"nodule in the {side} {('upper', 'middle', 'lower')[z]} field" if has else "normal")
    return texts


def write_tb_phantom(out: Path, seq: np.random.SeedSequence, sizes: PhantomSizes) -> pd.DataFrame:
    rng = np.random.default_rng(seq)
    n = sizes.tb_images
    latent = sample_latent(rng, n)
    nodule = rng.permutation(np.arange(n) < n // 2)
    params, batch = draw_cxrs(rng, latent, sizes.img_size, nodule=nodule)
    findings = nodule_findings(params)
    content = [{"sex": rng.choice(["male", "female"]), "age": f"{int(rng.integers(10, 80))}yrs",
                "findings": findings[i], "image": batch.images[i]} for i in range(n)]
    write_tb(out, seed=seed_of(seq), content=content)
    names = pd.read_csv(out / "shenzhen_metadata.csv", usecols=["study_id"])["study_id"].to_numpy()
    return truth_table(patient_ids(5, n), latent, params, batch).assign(study_id=names)


@dataclass(frozen=True)
class Release:
    stage: int
    subdir: str  # under the output folder; the converter's ``raw``
    write: Callable[[Path, np.random.SeedSequence, PhantomSizes], pd.DataFrame]


# Registry order fixes each release's SeedSequence child: append, never reorder.
RELEASES: dict[str, Release] = {
    "chexpert": Release(1, "chexpert/CheXpert-v1.0-small", write_chexpert),
    "symile": Release(2, "symile/data_npy", write_symile),
    "chexchonet": Release(3, "chexchonet", write_chexchonet_phantom),
    "covidqu_seg": Release(3, "covidqu_seg", write_covidqu_seg_phantom),
    "tb": Release(3, "tb", write_tb_phantom),
}

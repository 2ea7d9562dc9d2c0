"""The phantom's ECG and blood labs, driven by the latent, and its Symile record function.

ECG: ``pacx.testing.symile.ecg_beat_model`` with its arguments from the latent (``ECG_LINKS``); labs: 50
values in Symile's order from hand-set loadings (``LAB_LINKS``) with per-panel missingness
(``LAB_PANELS``). The links and why: docs/design.md#phantom-physio.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from pacx.data.symile_files import N_LABS, SYMILE_ECG_LEADS, SYMILE_LABS
from pacx.demo.phantom.cxr import render_cxr, sample_cxr_params
from pacx.demo.phantom.latent import LATENT_NAMES, column
from pacx.testing.symile import SymileRecord, default_lead_vectors, ecg_beat_model

NODULE_RATE = 0.1  # population prevalence of the plain finding on Stage 1 / Stage 2 radiographs

# ecg_beat_model argument -> (base, {latent: slope}, (lo, hi)); the QRS gain is multiplicative (exp).
ECG_LINKS: dict[str, tuple[float, dict[str, float], tuple[float, float]]] = {
    "heart_rate": (75.0, {"heart_rate": 13.0}, (42.0, 150.0)),
    "qrs_amp": (0.0, {"lv_hypertrophy": 0.22, "cardiac_size": 0.08, "fluid": -0.12}, (-1.0, 1.0)),
    "t_amp": (0.3, {"renal": 0.08, "lv_hypertrophy": -0.04}, (0.05, 0.8)),
    "p_amp": (0.12, {"cardiac_size": 0.03}, (0.03, 0.3)),
    "axis_deg": (0.0, {"lv_hypertrophy": -8.0}, (-60.0, 60.0)),
}

LAB_LINKS: dict[str, dict[str, float]] = {
    "Creatinine": {"renal": 0.85, "lv_hypertrophy": 0.1},
    "Urea Nitrogen": {"renal": 0.8, "fluid": 0.2},
    "Potassium": {"renal": 0.5},
    "Phosphate": {"renal": 0.5},
    "Magnesium": {"renal": 0.3},
    "Bicarbonate": {"renal": -0.45},
    "Calculated Total CO2": {"renal": -0.4},
    "Anion Gap": {"renal": 0.45},
    "Base Excess": {"renal": -0.4},
    "pH": {"renal": -0.3},
    "Calcium, Total": {"renal": -0.3},
    "Hemoglobin": {"renal": -0.35, "fluid": -0.2},
    "Hematocrit": {"renal": -0.35, "fluid": -0.2},
    "Red Blood Cells": {"renal": -0.3, "fluid": -0.2},
    "Sodium": {"fluid": -0.45, "cardiac_size": -0.25},
    "Albumin": {"fluid": -0.5},
    "Chloride": {"fluid": -0.25},
    "pO2": {"fluid": -0.5},
    "pCO2": {"fluid": 0.2, "heart_rate": -0.3},
    "Lactate": {"heart_rate": 0.45, "fluid": 0.3, "cardiac_size": 0.2},
    "RDW": {"cardiac_size": 0.5},
    "RDW-SD": {"cardiac_size": 0.5},
    "Bilirubin, Total": {"cardiac_size": 0.45},
    "Asparate Aminotransferase (AST)": {"cardiac_size": 0.4},
    "Alanine Aminotransferase (ALT)": {"cardiac_size": 0.35},
    "INR(PT)": {"cardiac_size": 0.4},
    "PT": {"cardiac_size": 0.4},
    "Alkaline Phosphatase": {"cardiac_size": 0.25},
    "Glucose": {"lv_hypertrophy": 0.3, "heart_rate": 0.3},
    "White Blood Cells": {"heart_rate": 0.5},
    "Neutrophils": {"heart_rate": 0.45},
    "Absolute Neutrophil Count": {"heart_rate": 0.5},
    "Lymphocytes": {"heart_rate": -0.35},
    "Immature Granulocytes": {"heart_rate": 0.35},
}
LAB_NOISE = (0.6, 1.0)  # noise SD of a linked / an unlinked lab

# Observation probability per panel; labs not listed use DEFAULT_OBSERVED. Blood gases get +0.5 logit per
# SD of fluid.
LAB_PANELS: dict[str, tuple[float, tuple[str, ...]]] = {
    "chemistry": (0.93, ("Creatinine", "Urea Nitrogen", "Potassium", "Sodium", "Chloride", "Bicarbonate",
                         "Anion Gap", "Glucose", "Calcium, Total", "Magnesium", "Phosphate")),
    "blood count": (0.92, ("Hemoglobin", "Hematocrit", "Red Blood Cells", "White Blood Cells",
                           "Platelet Count", "MCH", "MCHC", "MCV", "RDW", "RDW-SD")),
    "blood gas": (0.3, ("Base Excess", "Calculated Total CO2", "Lactate", "pCO2", "pH", "pO2")),
    "rare": (0.3, ("Creatine Kinase (CK)", "Immature Granulocytes", "Absolute Basophil Count",
                   "Absolute Eosinophil Count", "Absolute Monocyte Count", "Absolute Neutrophil Count",
                   "Absolute Lymphocyte Count")),
}
DEFAULT_OBSERVED = 0.72
GAS_FLUID_LOGIT = 0.5

LAB_NAMES: tuple[str, ...] = tuple(name for _, name in SYMILE_LABS)


def _linear(base: float, slopes: Mapping[str, float], latent: np.ndarray) -> np.ndarray:
    return base + sum(w * column(latent, k) for k, w in slopes.items())


@functools.cache
def _lab_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Loadings [50, D], noise SD [50], observation probability [50] and blood-gas flags [50]."""
    unknown = (set(LAB_LINKS) | {n for _, names in LAB_PANELS.values() for n in names}) - set(LAB_NAMES)
    if unknown:
        raise KeyError(f"unknown lab names {sorted(unknown)}")
    loadings = np.array([[LAB_LINKS.get(lab, {}).get(k, 0.0) for k in LATENT_NAMES] for lab in LAB_NAMES])
    noise = np.where(np.abs(loadings).sum(axis=1) > 0, *LAB_NOISE)
    observed = np.full(N_LABS, DEFAULT_OBSERVED)
    for p, names in LAB_PANELS.values():
        observed[[LAB_NAMES.index(n) for n in names]] = p
    gas = np.isin(LAB_NAMES, LAB_PANELS["blood gas"][1])
    return loadings, noise, observed, gas


def lab_values(rng: np.random.Generator, latent: np.ndarray) -> np.ndarray:
    """Raw lab values (z units) for ``latent`` [N, D] -> float [N, 50], NaN = not measured (>= 1 measured)."""
    loadings, noise, p_obs, gas = _lab_tables()
    n = len(latent)
    values = latent @ loadings.T + noise * rng.standard_normal((n, N_LABS))  # [N, 50]
    logit = np.log(p_obs / (1 - p_obs)) + GAS_FLUID_LOGIT * gas * column(latent, "fluid")[:, None]
    observed = rng.random((n, N_LABS)) < 1 / (1 + np.exp(-logit))
    observed[np.arange(n), rng.integers(N_LABS, size=n)] = True  # Symile keeps admissions with a lab
    return np.where(observed, values, np.nan)


def ecg_arguments(latent: np.ndarray) -> dict[str, float]:
    """``ECG_LINKS`` evaluated for one latent [D]."""
    return {arg: float(np.clip(_linear(base, slopes, latent), *bounds))
            for arg, (base, slopes, bounds) in ECG_LINKS.items()}


def phantom_ecg(rng: np.random.Generator, latent: np.ndarray) -> np.ndarray:
    """A 12-lead ECG in millivolts, float64 [5000, 12] in Symile lead order, for one latent [D]."""
    a = ecg_arguments(latent)
    angle = np.deg2rad(a["axis_deg"] + rng.normal(0.0, 12.0))  # frontal-plane rotation of the heart vector
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return ecg_beat_model(
        rng, heart_rate=a["heart_rate"], qrs_amp=float(np.exp(a["qrs_amp"])), t_amp=a["t_amp"],
        p_amp=a["p_amp"], hrv=rng.uniform(0.01, 0.05),
        lead_gains=rng.uniform(0.85, 1.15, size=len(SYMILE_ECG_LEADS)),
        lead_vectors=default_lead_vectors() @ rotation, wander_amp=rng.uniform(0.03, 0.2),
        mains_amp=rng.uniform(0.0, 0.02), noise_std=rng.uniform(0.005, 0.03),
    )


def phantom_record(rng: np.random.Generator, latent: np.ndarray, cxr_size: int) -> SymileRecord:
    """One Symile admission (``RecordFn``): phantom CXR, ECG and raw labs (NaN = missing) of ``latent``
    [D]."""
    params = sample_cxr_params(rng, latent[None], nodule=NODULE_RATE)
    image = render_cxr(params, cxr_size).images[0]
    return SymileRecord(image, phantom_ecg(rng, latent), lab_values(rng, latent[None])[0])

"""Writer of a Symile-MIMIC ``data_npy/`` tree in its real layout (docs/datasets.md#symile), for tests, demo.

Generators (``RecordFn``: a CXR, a 12-lead ECG from a P-QRS-T beat model, 50 lab percentiles) are kept apart
from the layout (:func:`write_symile_release`, :func:`write_teacher_features`), which writes the files as
Symile's ``process_and_save_tensors`` does, so a physiology phantom can replace the generators. Everything is
determined by ``seed``. Details: docs/design.md#test-releases.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pacx.constants import ECG_EMBED_DIM, IMAGENET_MEAN, IMAGENET_STD, LABS_EMBED_DIM
from pacx.data.symile_files import (
    ECG_SAMPLES,
    ECG_SAMPLING_HZ,
    FILES,
    LABS_MEANS_FILE,
    LABS_MEANS_KEY,
    N_LABS,
    SYMILE_ECG_LEADS,
    SYMILE_LABS,
)
from pacx.teachers import TEACHERS
from pacx.testing.images import simple_cxr
from pacx.utils import write_json_atomic

log = logging.getLogger(__name__)

LATENT_DIM = 8

# ------------------------------------------------------------------------------------------ ECG generator

# Lead axes in body coordinates (x: patient's left, y: inferior, z: anterior). Limb leads lie on the
# hexaxial frontal-plane angles, augmented leads scaled by sqrt(3)/2 so Einthoven's relations hold
# (III = II - I, aVR = -(I + II)/2, ...); chest leads lie in the horizontal plane from V6 (left) to V1.
_LIMB_DEG = {"I": (0, 1.0), "II": (60, 1.0), "III": (120, 1.0), "aVR": (-150, 0.866), "aVF": (90, 0.866),
             "aVL": (-30, 0.866)}
_CHEST_DEG = {"V1": 115, "V2": 90, "V3": 75, "V4": 60, "V5": 30, "V6": 0}
_CHEST_GAIN = 1.5


def default_lead_vectors() -> np.ndarray:
    """[12, 3] lead axes in Symile lead order."""
    rows = []
    for lead in SYMILE_ECG_LEADS:
        if lead in _LIMB_DEG:
            deg, scale = _LIMB_DEG[lead]
            a = np.deg2rad(deg)
            rows.append((scale * np.cos(a), scale * np.sin(a), 0.0))
        else:
            a = np.deg2rad(_CHEST_DEG[lead])
            rows.append((_CHEST_GAIN * np.cos(a), 0.0, _CHEST_GAIN * np.sin(a)))
    return np.asarray(rows)


@dataclass(frozen=True)
class Wave:
    """One deflection: a Gaussian ``offset`` s from the R peak, ``sigma`` s wide, along ``direction``."""

    offset: float
    sigma: float
    direction: tuple[float, float, float]


# P, septal q, R, S and T; amplitudes come from ecg_beat_model's arguments.
BEAT_WAVES = {
    "P": Wave(-0.16, 0.022, (0.6, 0.75, 0.2)),
    "Q": Wave(-0.025, 0.008, (-0.5, 0.2, 0.8)),
    "R": Wave(0.0, 0.010, (0.55, 0.8, -0.25)),
    "S": Wave(0.03, 0.010, (-0.3, -0.5, -0.8)),
    "T": Wave(0.28, 0.045, (0.5, 0.7, 0.35)),  # offset scaled by sqrt(RR) (QT shortens with rate)
}


def ecg_beat_model(
    rng: np.random.Generator,
    heart_rate: float = 70.0,
    qrs_amp: float = 1.0,
    t_amp: float = 0.3,
    p_amp: float = 0.12,
    hrv: float = 0.03,
    lead_gains: np.ndarray | None = None,
    lead_vectors: np.ndarray | None = None,
    wander_amp: float = 0.1,
    mains_amp: float = 0.01,
    mains_hz: float = 60.0,
    noise_std: float = 0.01,
    fs: int = ECG_SAMPLING_HZ,
    n_samples: int = ECG_SAMPLES,
) -> np.ndarray:
    """A 12-lead ECG in millivolts, float64 [n_samples, 12] in Symile lead order.

    Beats start at a random phase, RR intervals are ``60 / heart_rate`` with relative jitter ``hrv``.
    Each beat sums the ``BEAT_WAVES`` Gaussians; a wave's heart vector is projected on the lead axes
    (``lead_vectors`` [12, 3]) and scaled by ``lead_gains`` [12]. Respiratory baseline wander (a 3-D
    vector through the same axes), mains hum at ``mains_hz`` and white noise are added.
    """
    lead_vectors = default_lead_vectors() if lead_vectors is None else np.asarray(lead_vectors, float)
    gains = np.ones(len(lead_vectors)) if lead_gains is None else np.asarray(lead_gains, float)
    t = np.arange(n_samples) / fs  # [T]
    rr = 60.0 / heart_rate
    n_beats = int(np.ceil(t[-1] / rr * 1.3)) + 3
    intervals = rr * (1 + hrv * rng.standard_normal(n_beats)).clip(0.7, 1.3)
    r_times = -rng.uniform(0, rr) + np.cumsum(intervals)  # [B]
    r_times = r_times[r_times < t[-1] + 0.5]
    amps = {"P": p_amp, "Q": 0.15 * qrs_amp, "R": qrs_amp, "S": 0.35 * qrs_amp, "T": t_amp}
    qt_scale = np.sqrt(rr)
    heart = np.zeros((n_samples, 3))  # heart vector over time [T, 3]
    for name, wave in BEAT_WAVES.items():
        offset = wave.offset * (qt_scale if name == "T" else 1.0)
        centres = r_times + offset  # [B]
        # Each Gaussian is evaluated within 6 sigma of its centre only (beyond, < 2e-8 of its peak).
        half = int(np.ceil(6 * wave.sigma * fs))
        idx = np.round(centres * fs).astype(int)[:, None] + np.arange(-half, half + 1)  # [B, W]
        inside = (idx >= 0) & (idx < n_samples)
        values = np.exp(-0.5 * ((idx / fs - centres[:, None]) / wave.sigma) ** 2)  # [B, W]
        pulse = np.bincount(idx[inside], values[inside], minlength=n_samples)  # [T]
        direction = np.asarray(wave.direction) / np.linalg.norm(wave.direction)
        heart += amps[name] * pulse[:, None] * direction[None, :]
    freqs = rng.uniform(0.1, 0.4, size=3)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    heart += wander_amp * np.sin(2 * np.pi * freqs[None, :] * t[:, None] + phases[None, :])
    ecg = heart @ lead_vectors.T * gains[None, :]  # [T, 12]
    ecg += mains_amp * np.sin(2 * np.pi * mains_hz * t + rng.uniform(0, 2 * np.pi))[:, None]
    return ecg + noise_std * rng.standard_normal(ecg.shape)


def minmax_scale(ecg: np.ndarray) -> np.ndarray:
    """Per-record min-max to [-1, 1] jointly over all leads (Symile ``get_ecg``), float32; both ends hit."""
    lo, hi = ecg.min(), ecg.max()
    return (2 * (ecg - lo) / (hi - lo) - 1).astype(np.float32)


# ------------------------------------------------------------------------------------------ record generator


@dataclass(frozen=True)
class SymileRecord:
    """One admission as generated: the layout writer turns it into release rows."""

    cxr: np.ndarray  # uint8 [S, S] grayscale
    ecg: np.ndarray  # float [5000, 12] millivolts, Symile lead order
    # float [50] percentiles in [0, 1] (raw values with fit_lab_percentiles), NaN = not measured
    labs: np.ndarray


# record_fn(rng, latent [LATENT_DIM], cxr_size) -> SymileRecord
RecordFn = Callable[[np.random.Generator, np.ndarray, int], SymileRecord]


@functools.cache
def _lab_model() -> tuple[np.ndarray, np.ndarray]:
    """Fixed lab loadings [50, LATENT_DIM] and per-lab observation probabilities [50] (mean ~0.7)."""
    rng = np.random.default_rng(12345)
    loadings = rng.normal(0, 0.5, size=(N_LABS, LATENT_DIM))
    p_observed = rng.uniform(0.45, 0.95, size=N_LABS)
    return loadings, p_observed


def synthetic_record(rng: np.random.Generator, latent: np.ndarray, cxr_size: int) -> SymileRecord:
    """Latent -> ECG heart rate, QRS and T amplitudes, and lab percentiles; the CXR is ``simple_cxr``."""
    ecg = ecg_beat_model(
        rng,
        heart_rate=float(np.clip(72 + 12 * latent[0], 45, 140)),
        qrs_amp=float(np.clip(1.0 + 0.25 * latent[1], 0.4, 2.0)),
        t_amp=float(np.clip(0.3 + 0.1 * latent[2], 0.05, 0.7)),
        lead_gains=rng.uniform(0.85, 1.15, size=len(SYMILE_ECG_LEADS)),
    )
    loadings, p_observed = _lab_model()
    score = loadings @ latent + 0.5 * rng.standard_normal(N_LABS)
    labs = 1 / (1 + np.exp(-1.7 * score))  # ~ normal CDF: percentiles in (0, 1)
    observed = rng.random(N_LABS) < p_observed
    observed[rng.integers(N_LABS)] = True  # Symile keeps admissions with at least one lab
    labs[~observed] = np.nan
    return SymileRecord(simple_cxr(rng, cxr_size, cxr_size, frontal=True), ecg, labs)


def train_percentiles(train: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Percentiles of ``values`` [N, L] under each lab's NaN-aware empirical CDF fitted on ``train`` [M, L]
    (the share of observed train values <= x, as Symile); NaN stays NaN; a lab never observed in train ->
    0.5."""
    out = np.full(values.shape, np.nan)
    for j in range(values.shape[1]):
        ref = np.sort(train[:, j][~np.isnan(train[:, j])])
        seen = ~np.isnan(values[:, j])
        out[seen, j] = np.searchsorted(ref, values[seen, j], side="right") / len(ref) if len(ref) else 0.5
    return out


def normalized_cxr(gray: np.ndarray) -> np.ndarray:
    """uint8 [S, S] -> float32 [3, S, S]: replicated to RGB, ``ToTensor`` scaling, ImageNet norm."""
    x = gray.astype(np.float32)[None] / 255.0
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return ((x - mean) / std).astype(np.float32)


# ------------------------------------------------------------------------------------------ layout


def _retrieval_rows(rng: np.random.Generator, n: int, n_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """(source row [n * n_candidates], query [n * n_candidates]): queries first, then negatives per query."""
    if n < n_candidates:
        raise ValueError(f"a retrieval split needs at least n_candidates={n_candidates} queries, got {n}")
    negatives = [rng.choice(np.delete(np.arange(n), q), n_candidates - 1, replace=False) for q in range(n)]
    source = np.concatenate([np.arange(n), *negatives])
    query = np.concatenate([np.arange(n), np.repeat(np.arange(n), n_candidates - 1)])
    return source, query


def _path(out: Path, split: str, key: str) -> Path:
    """``<out>/<split>/<file name>`` of file ``key``, named by the table in ``symile_files`` or, for teacher
    features (``ecg_features``), by the teacher registry."""
    specs = {s.key: s for s in (*FILES, *(t.feature_spec for t in TEACHERS.values()))}
    (out / split).mkdir(parents=True, exist_ok=True)
    return out / split / specs[key].filename(split)


def write_symile_release(
    out: str | Path,
    n_train: int = 64,
    n_val: int = 16,
    n_test_queries: int = 12,
    n_candidates: int = 10,
    cxr_size: int = 320,
    seed: int = 0,
    record_fn: RecordFn = synthetic_record,
    write_teacher_features: bool = False,
    latents: np.ndarray | None = None,
    fit_lab_percentiles: bool = False,
    write_test_uni: bool | None = None,
) -> Path:
    """Write a ``data_npy`` tree at ``out`` (returned): train, val, val_retrieval, test (+ test_uni).

    ``val_retrieval`` has ``n_val`` queries (the val rows) and ``test`` ``n_test_queries``, each with
    ``n_candidates - 1`` negatives. Big arrays are filled in place through ``open_memmap``.

    A caller may pass each admission's ``latents`` [n_train + n_val + n_test_queries, D] (rows in the order
    train, val, test; default standard normal [.., LATENT_DIM]); ``record_fn`` receives its row. With
    ``fit_lab_percentiles`` the records hold raw lab values, turned into percentiles of the train rows'
    empirical CDF (``train_percentiles``) as Symile does. ``write_test_uni`` (default: with the teacher
    features) writes ``test_uni``'s CXR and ``hadm_id_test.npy``, from which ``pacx.teachers`` derives its
    features.
    """
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test_queries}
    n_total = sum(counts.values())
    root_seq, *record_seqs = np.random.SeedSequence(seed).spawn(1 + n_total)
    rng = np.random.default_rng(root_seq)
    hadm_all = 20_000_000 + rng.choice(10_000_000, size=n_total, replace=False).astype(np.int64)
    drawn = rng.standard_normal((n_total, LATENT_DIM))  # drawn either way: the same rows follow for a seed
    latents = drawn if latents is None else np.asarray(latents, float)
    if len(latents) != n_total:
        raise ValueError(f"latents: expected {n_total} rows (train + val + test queries), got {len(latents)}")
    first = {"train": 0, "val": n_train, "test": n_train + n_val}

    # Row plans: source record (within the split's admissions) and query of every output row.
    plans = {"train": (np.arange(n_train), None), "val": (np.arange(n_val), None)}
    plans["val_retrieval"] = _retrieval_rows(rng, n_val, n_candidates)
    plans["test"] = _retrieval_rows(rng, n_test_queries, n_candidates)
    source_of = {"train": "train", "val": "val", "val_retrieval": "val", "test": "test"}

    # Generate each admission once, into the first output split holding it (rows 0..n-1 are the
    # admissions in order for every split), then copy rows for retrieval negatives and val_retrieval.
    raw_labs = np.empty((n_total, N_LABS))
    maps: dict[str, dict[str, np.ndarray]] = {}
    for split, (source, _) in plans.items():
        n = len(source)
        maps[split] = {
            "cxr": np.lib.format.open_memmap(_path(out, split, "cxr"), "w+", np.float32,
                                             (n, 3, cxr_size, cxr_size)),
            "ecg": np.lib.format.open_memmap(_path(out, split, "ecg"), "w+", np.float32,
                                             (n, 1, ECG_SAMPLES, len(SYMILE_ECG_LEADS))),
        }
    for split in ("train", "val", "test"):
        for i in range(counts[split]):
            k = first[split] + i
            rec = record_fn(np.random.default_rng(record_seqs[k]), latents[k], cxr_size)
            maps[split]["cxr"][i] = normalized_cxr(rec.cxr)
            maps[split]["ecg"][i, 0] = minmax_scale(rec.ecg)
            raw_labs[k] = rec.labs
    for split in ("val_retrieval", "test"):
        source = plans[split][0]
        held = maps[source_of[split]]
        done = counts[split] if split in counts else 0  # test's queries were generated in place
        for key, arr in maps[split].items():
            for row in range(done, len(source)):
                arr[row] = held[key][source[row]]
    for arrays in maps.values():
        for arr in arrays.values():
            arr.flush()
    maps.clear()

    if fit_lab_percentiles:
        raw_labs = train_percentiles(raw_labs[:n_train], raw_labs)
    train_labs = raw_labs[:n_train]
    observed_any = ~np.isnan(train_labs).all(axis=0)
    if not observed_any.all():
        log.warning("%d lab(s) never observed in train; their mean percentile is set to 0.5",
                    int((~observed_any).sum()))
    means = np.where(observed_any, np.nanmean(np.where(observed_any, train_labs, 0.5), axis=0), 0.5)
    keys = [LABS_MEANS_KEY.format(itemid=itemid) for itemid, _ in SYMILE_LABS]
    write_json_atomic(out / LABS_MEANS_FILE, {k: float(m) for k, m in zip(keys, means)})
    missing = np.isnan(raw_labs)
    percentiles = np.where(missing, means[None, :], raw_labs).astype(np.float32)

    if write_teacher_features:
        dim = latents.shape[1]
        w_ecg = rng.standard_normal((dim, ECG_EMBED_DIM)) / np.sqrt(dim)
        w_labs = rng.standard_normal((dim, LABS_EMBED_DIM)) / np.sqrt(dim)
        ecg_feat = latents @ w_ecg + 0.1 * rng.standard_normal((n_total, ECG_EMBED_DIM))  # [n_total, 1024]
        labs_feat = latents @ w_labs + 0.1 * rng.standard_normal((n_total, LABS_EMBED_DIM))  # [n_total, 256]
        ecg_feat, labs_feat = ecg_feat.astype(np.float32), labs_feat.astype(np.float32)

    for split, (source, query) in plans.items():
        idx = first[source_of[split]] + source  # admission of each row
        np.save(_path(out, split, "labs_percentiles"), percentiles[idx])
        np.save(_path(out, split, "labs_missingness"), (~missing[idx]).astype(np.int64))  # int64 as Symile
        np.save(_path(out, split, "hadm_id"), hadm_all[idx])
        if query is not None:
            np.save(_path(out, split, "label"), (source == query).astype(np.int64))
            np.save(_path(out, split, "label_hadm_id"), hadm_all[first[source_of[split]] + query])
        # docs/datasets.md#teacher-features: no features for val_retrieval
        if write_teacher_features and split != "val_retrieval":
            np.save(_path(out, split, "ecg_features"), ecg_feat[idx])
            np.save(_path(out, split, "labs_features"), labs_feat[idx])

    if write_teacher_features if write_test_uni is None else write_test_uni:
        n = n_test_queries  # test_uni (docs/datasets.md#teacher-features): the test queries only
        for key in ("cxr", "ecg_features", "labs_features") if write_teacher_features else ("cxr",):
            np.save(_path(out, "test_uni", key), np.load(_path(out, "test", key), mmap_mode="r")[:n])
        # As the reference: hadm_id_test.npy there holds the queries' label_hadm_id.
        np.save(_path(out, "test_uni", "hadm_id"), np.load(_path(out, "test", "label_hadm_id"))[:n])

    log.info("wrote synthetic Symile-MIMIC at %s: train %d, val %d, val_retrieval %d, test %d rows%s",
             out, n_train, n_val, len(plans["val_retrieval"][0]), len(plans["test"][0]),
             " (+ teacher features, test_uni)" if write_teacher_features else "")
    return out

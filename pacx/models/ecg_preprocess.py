"""ECGFounder's official ECG preprocessing, vectorised over a whole batch (docs/ecgfounder.md#preprocessing).

Every step of the official per-record ``dataset.py`` runs on the whole batch along the time axis, with no loop
over records or leads, and equals it (tested). Output: float32 **numpy** [N, L, T]. Inputs name their axes
(N records, L leads, T samples, 1 singleton): ``"N1TL"`` as Symile-MIMIC stores ECGs ([N, 1, 5000, 12]),
``"NTL"`` or ``"NLT"``; a batch axis is always required.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage, signal

from pacx.constants import MIMIC_LEAD_ORDER, STANDARD_LEAD_ORDER

SYMILE_LAYOUT = "N1TL"
ECG_LAYOUTS: tuple[str, ...] = ("N1TL", "NTL", "NLT")


def to_leads_by_time(ecg: np.ndarray, layout: str, n_leads: int, n_samples: int) -> np.ndarray:
    """View a batch in ``layout`` as [N, L, T]; raise naming the expected and actual shape otherwise."""
    if layout not in ECG_LAYOUTS:
        raise ValueError(f"unknown ECG layout {layout!r}; known: {list(ECG_LAYOUTS)} "
                         "(N records, 1 singleton, T samples, L leads)")
    sizes = {"1": 1, "L": n_leads, "T": n_samples}
    fits = ecg.ndim == len(layout) and all(
        axis == "N" or size == sizes[axis] for axis, size in zip(layout, ecg.shape)
    )
    if not fits:
        expected = ", ".join("N" if axis == "N" else str(sizes[axis]) for axis in layout)
        raise ValueError(
            f"ECG batch in layout {layout!r} must have shape [{expected}], got {list(ecg.shape)}"
        )
    kept = layout.replace("1", "")
    ecg = ecg.reshape([size for axis, size in zip(layout, ecg.shape) if axis != "1"])
    return ecg.transpose([kept.index(axis) for axis in "NLT"])  # [N, L, T]


def lead_indices(source_lead_order: Sequence[str], target_lead_order: Sequence[str]) -> list[int]:
    """Indices that pick ``target_lead_order`` out of data stored in ``source_lead_order``."""
    source, target = list(source_lead_order), list(target_lead_order)
    if len(set(source)) != len(source):
        raise ValueError(f"source_lead_order has duplicate leads: {source}")
    absent = [lead for lead in target if lead not in source]
    if absent:
        raise ValueError(f"leads {absent} are not in source_lead_order {source}")
    return [source.index(lead) for lead in target]


def notch_and_bandpass(
    x: np.ndarray, fs: float, notch_hz: float, notch_q: float, band_hz: tuple[float, float], band_order: int
) -> np.ndarray:
    """Zero-phase power-line notch, then zero-phase Butterworth band-pass, along the last axis."""
    b, a = signal.iirnotch(notch_hz, notch_q, fs=fs)
    x = signal.filtfilt(b, a, x, axis=-1)
    b, a = signal.butter(band_order, band_hz, btype="bandpass", fs=fs)  # (b, a): order 2·band_order
    return signal.filtfilt(b, a, x, axis=-1)


def baseline_kernel_size(fs: float, window_s: float) -> int:
    """The official median window: ``int(window_s·fs) + 1``, made odd (201 at 500 Hz, 0.4 s)."""
    k = int(window_s * fs) + 1
    return k if k % 2 else k + 1


def median_baseline(x: np.ndarray, kernel_size: int) -> np.ndarray:
    """Running median along the last axis with zero-padded edges (``scipy.signal.medfilt`` per row).

    All rows are laid end to end in one 1-D array with ``kernel_size // 2`` zeros between them, so a
    window never reaches the next row and sees exactly the zero padding ``medfilt`` uses; one call of
    scipy's fast 1-D median then filters the whole batch (an N-d ``median_filter`` is ~20× slower).
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"median kernel must be odd, got {kernel_size}")
    rows = x.reshape(-1, x.shape[-1])  # [R, T]
    gapped = np.pad(rows, ((0, 0), (0, kernel_size // 2)))  # [R, T + k//2], zero gap after each row
    med = ndimage.median_filter(gapped.ravel(), size=kernel_size, mode="constant", cval=0.0)
    return med.reshape(gapped.shape)[:, : x.shape[-1]].reshape(x.shape)


def zscore_global(x: np.ndarray, eps: float) -> np.ndarray:
    """[N, L, T]: one mean and one population std per record over all leads and samples."""
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    return (x - mean) / (std + eps)


def preprocess_ecg(
    ecg: ArrayLike,
    source_lead_order: Sequence[str] = MIMIC_LEAD_ORDER,
    *,
    layout: str = SYMILE_LAYOUT,
    n_samples: int = 5000,
    target_lead_order: Sequence[str] = STANDARD_LEAD_ORDER,
    fs: float = 500.0,
    filtering: bool = True,
    notch_hz: float = 50.0,
    notch_q: float = 30.0,
    band_hz: tuple[float, float] = (0.67, 40.0),
    band_order: int = 4,
    baseline_window_s: float = 0.4,
    eps: float = 1e-8,
) -> np.ndarray:
    """A batch of raw ECGs -> ECGFounder input, float32 numpy [N, len(target_lead_order), n_samples].

    ``ecg`` is a numpy array or CPU tensor in ``layout`` whose lead axis follows
    ``source_lead_order`` (default: the MIMIC/Symile order). The defaults are the official
    ``dataset.py`` values; ``filtering=False`` skips notch, band-pass and baseline removal, as the
    authors' own ``ptbxl_eval.py`` does (an ablation). Units do not matter: everything before the
    z-score is linear.
    """
    x = to_leads_by_time(np.asarray(ecg), layout, len(source_lead_order), n_samples)
    x = np.asarray(x, dtype=np.float64)
    x = np.where(np.isnan(x), 0.0, x)  # NaN -> 0 before any filtering
    x = x[:, lead_indices(source_lead_order, target_lead_order)]  # [N, L, T], standard order
    if filtering:
        x = notch_and_bandpass(x, fs, notch_hz, notch_q, band_hz, band_order)
        x = x - median_baseline(x, baseline_kernel_size(fs, baseline_window_s))
    return zscore_global(x, eps).astype(np.float32)

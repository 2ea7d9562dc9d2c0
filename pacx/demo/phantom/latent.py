"""The physiological latent state of a phantom patient, and the echo-style labels derived from it.

Every phantom patient has five named latent variables, each standard normal (a z-score against the
phantom population), drawn jointly from ``N(0, CORRELATION)``:

- ``cardiac_size``: left-ventricular dilation; drives the cardiac silhouette width on the CXR and LVIDd.
- ``lv_hypertrophy``: wall thickness; drives QRS voltage on the ECG and IVSd / LVPWd.
- ``fluid``: volume status / congestion; drives basal lung haze and costophrenic blunting on the CXR,
  lower QRS voltage, dilutional labs (sodium, albumin) and hypoxaemia.
- ``heart_rate``: sinus rate; drives the ECG RR interval and stress labs (lactate, white cells).
- ``renal``: renal dysfunction (higher = worse); drives creatinine, urea, potassium (peaked T waves).

The correlations (``CORRELATION``, rows/columns in ``LATENT_NAMES`` order) encode textbook links, not
fitted values: dilated hearts go with congestion (0.5); hypertension drives both hypertrophy and
kidney disease (0.3 each); kidney disease retains fluid (0.4); congestion raises the rate (0.3);
dilation and hypertrophy co-occur (0.4). Everything else is small.

The physiology-dense label follows CheXchoNet (docs/datasets.md#chexchonet): echo measurements in cm from the latent
plus measurement noise, severe LV hypertrophy (``slvh``: IVSd or LVPWd >= ``SLVH_CM``), dilated LV
(``dlv``: LVIDd >= ``DLV_CM``) and ``composite_slvh_dlv``. The cut-offs are phantom values chosen for
a demo-scale prevalence (~30 % composite, mostly DLV, i.e. cardiac size above ~+0.6 SD), not the
clinical ones.
"""

from __future__ import annotations

import numpy as np

LATENT_NAMES: tuple[str, ...] = ("cardiac_size", "lv_hypertrophy", "fluid", "heart_rate", "renal")
LATENT_DIM = len(LATENT_NAMES)
LATENT_INDEX = {name: i for i, name in enumerate(LATENT_NAMES)}

#                      cardiac  lvh   fluid   hr   renal
CORRELATION = np.array([
    [1.00, 0.40, 0.50, 0.10, 0.30],  # cardiac_size
    [0.40, 1.00, 0.20, -0.10, 0.30],  # lv_hypertrophy
    [0.50, 0.20, 1.00, 0.30, 0.40],  # fluid
    [0.10, -0.10, 0.30, 1.00, 0.10],  # heart_rate
    [0.30, 0.30, 0.40, 0.10, 1.00],  # renal
])

# Echo measurements (cm): baseline + slope per SD of the driving latent, and measurement noise.
LVIDD_CM = (4.95, 0.55, 0.08)  # LV internal diameter in diastole <- cardiac_size
IVSD_CM = (1.00, 0.20, 0.04)  # septal thickness <- lv_hypertrophy
LVPWD_CM = (0.97, 0.20, 0.04)  # posterior wall thickness <- lv_hypertrophy
DLV_CM = 5.3
SLVH_CM = 1.4


def sample_latent(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` patients' latents, float64 [n, LATENT_DIM] in ``LATENT_NAMES`` order, ~ N(0, CORRELATION)."""
    chol = np.linalg.cholesky(CORRELATION)  # [D, D]
    return rng.standard_normal((n, LATENT_DIM)) @ chol.T


def column(latent: np.ndarray, name: str) -> np.ndarray:
    """One named latent variable of ``latent`` [..., LATENT_DIM] -> [...]."""
    return latent[..., LATENT_INDEX[name]]


def echo_labels(rng: np.random.Generator, latent: np.ndarray) -> dict[str, np.ndarray]:
    """CheXchoNet echo columns for ``latent`` [N, D]: ``ivsd, lvpwd, lvidd`` (cm, 2 decimals) and the
    0/1 labels ``slvh, dlv, composite_slvh_dlv`` (int64 [N]), with fresh measurement noise from ``rng``."""
    n = len(latent)

    def measure(params: tuple[float, float, float], driver: str) -> np.ndarray:
        base, slope, noise = params
        return np.round(base + slope * column(latent, driver) + noise * rng.standard_normal(n), 2)

    lvidd = measure(LVIDD_CM, "cardiac_size")
    ivsd = measure(IVSD_CM, "lv_hypertrophy")
    lvpwd = measure(LVPWD_CM, "lv_hypertrophy")
    slvh = ((ivsd >= SLVH_CM) | (lvpwd >= SLVH_CM)).astype(np.int64)
    dlv = (lvidd >= DLV_CM).astype(np.int64)
    return {"ivsd": ivsd, "lvpwd": lvpwd, "lvidd": lvidd, "slvh": slvh, "dlv": dlv,
            "composite_slvh_dlv": slvh | dlv}

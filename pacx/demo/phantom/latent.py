"""The physiological latent state of a phantom patient, and the echo-style labels derived from it.

Five named standard-normal variables (``LATENT_NAMES``) drawn from ``N(0, CORRELATION)``, and
CheXchoNet-style echo measurements and labels (``echo_labels``). What each variable drives, the
correlations and the cut-offs: docs/design.md#phantom-latent.
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

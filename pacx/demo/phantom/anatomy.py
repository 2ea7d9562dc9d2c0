"""Anatomy of the phantom chest radiograph: soft shapes and the attenuation layers drawn from them.

Owns the coordinates (image ``u, v``; anatomical ``x, y`` through the inverse pose), the soft masks
(:class:`Shapes`) and ``LAYERS`` (``group.name`` -> attenuation map [N, H, W]). Where physiology enters
and why: docs/design.md#phantom-anatomy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

HEART_WIDTH_PER_SD = 0.12
HEART_HEIGHT_PER_SD = 0.04
HEART_AXES = (0.35, 0.235)  # transverse / vertical semi-axes at cardiac_size = 0
HEART_TILT = np.deg2rad(24.0)  # long axis descends towards the patient's left (the apex)
LUNG_CENTRE, LUNG_RADII = (0.26, 0.6), (0.56, 1.36)  # lateral border: an ellipse around (xi, y)
DOME_PEAK_XI, DOME_CURVATURE, DOME_MEDIAL_CURVATURE = 0.42, 1.3, 0.4
# Attenuation of the bones (soft tissue = 1 per body depth, lung air removes 0.62).
BONE = {"posterior_ribs": 0.5, "anterior_ribs": 0.18, "clavicles": 0.6, "spine": 0.3, "pedicles": 0.3,
        "humeri": 0.6, "scapulae": 0.15}

Params = Mapping[str, np.ndarray]  # named per-image parameters, each broadcast to [N, 1, 1] (or [N, K, 1, 1])


def soft(d: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Soft indicator of ``d > 0`` (``d``: signed distance inside a shape): a linear ramp ``2 * eps`` wide."""
    t = d / eps  # a new array; the rest is in place
    t *= 0.5
    t += 0.5
    return np.minimum(np.maximum(t, 0.0, out=t), 1.0, out=t)


def ellipse_depth(x: np.ndarray, y: np.ndarray, cx, cy, ax, ay) -> np.ndarray:
    """Approximate signed distance inside the ellipse centred (cx, cy) with semi-axes (ax, ay)."""
    scale = np.asarray(np.minimum(ax, ay), dtype=x.dtype)  # keep float32 float32
    return (1.0 - np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)) * scale


def band(t: np.ndarray, half_width: float | np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Soft indicator of ``|t| < half_width`` with brighter (cortical) edges: a bone cross-section."""
    inside = soft(half_width - np.abs(t), eps)
    cortex = np.exp(-0.5 * ((np.abs(t) - 0.8 * half_width) / (0.25 * half_width + eps)) ** 2)
    return inside * (0.65 + 0.35 * cortex)


@dataclass
class Frame:
    """Pixel grids of one batch: image (u, v) and anatomical (x, y) coordinates [N, H, W], edge width
    ``eps`` (about one pixel, anatomical units) [N, 1, 1] and the parameters ``p``."""

    u: np.ndarray
    v: np.ndarray
    x: np.ndarray
    y: np.ndarray
    eps: np.ndarray
    p: Params

    @property
    def xi(self) -> np.ndarray:
        return np.abs(self.x)


def heart_axes(p: Params) -> tuple[np.ndarray, np.ndarray]:
    """Semi-axes of the heart ellipse: the transverse one carries the cardiac latent."""
    ax = HEART_AXES[0] * p["heart_scale"] * (1.0 + HEART_WIDTH_PER_SD * p["cardiac_size"])
    ay = HEART_AXES[1] * p["heart_scale"] * (1.0 + HEART_HEIGHT_PER_SD * p["cardiac_size"])
    return ax, ay


def heart_transverse_diameter(p: Params) -> np.ndarray:
    """Horizontal extent of the tilted heart ellipse (anatomical units): the drawn silhouette width."""
    ax, ay = heart_axes(p)
    return 2.0 * np.sqrt((ax * np.cos(HEART_TILT)) ** 2 + (ay * np.sin(HEART_TILT)) ** 2)


def dome(f: Frame) -> np.ndarray:
    """Diaphragm height y_d(x) [N, H, W] per side (the right dome higher): steep towards the costophrenic
    angle, flatter medially where the heart rests on it."""
    top = np.where(f.x > 0, f.p["dome_left"], f.p["dome_right"])
    d = f.xi - DOME_PEAK_XI
    return top + np.where(d > 0, DOME_CURVATURE, DOME_MEDIAL_CURVATURE) * d ** 2


def lung_lateral(y: np.ndarray, p: Params) -> np.ndarray:
    """xi of the lateral lung border at height ``y`` (the ellipse's centre xi above and below it)."""
    (cx, cy), (ax, ay) = LUNG_CENTRE, LUNG_RADII
    ax = ax * p["lung_width"]
    return cx + ax * np.sqrt(np.clip(1.0 - ((y - cy - p["lung_shift"]) / ay) ** 2, 0.0, None))


@dataclass
class Shapes:
    """Soft masks [N, H, W] shared by the layers."""

    body: np.ndarray
    thorax: np.ndarray  # lung ellipses above the diaphragm, before heart and mediastinum
    below: np.ndarray  # below the diaphragm
    heart: np.ndarray
    knob: np.ndarray
    effusion: np.ndarray
    lung: np.ndarray  # aerated, visible lung: the segmentation target
    dome: np.ndarray  # y_d(x)


def build_shapes(f: Frame) -> Shapes:
    x, y, xi, p, eps = f.x, f.y, f.xi, f.p, f.eps
    neck, shoulder = 0.26, 1.0 * p["habitus"]
    half_width = neck + (shoulder - neck) * soft(y + 0.84, np.full_like(eps, 0.11))
    body = soft(half_width - xi, eps) * soft(y + 1.4, eps)
    (cx, cy), (ax, ay) = LUNG_CENTRE, LUNG_RADII
    ellipse = ellipse_depth(xi, y, cx, cy + p["lung_shift"], ax * p["lung_width"], ay)
    y_d = dome(f)
    above = soft(y_d - y, eps)
    thorax = soft(ellipse, eps) * soft(xi - 0.12, eps) * above
    ax_h, ay_h = heart_axes(p)
    c, s = float(np.cos(HEART_TILT)), float(np.sin(HEART_TILT))
    hx, hy = x - p["heart_x"], y - p["heart_y"]
    heart = soft(ellipse_depth(c * hx + s * hy, -s * hx + c * hy, 0.0, 0.0, ax_h, ay_h), eps)
    heart = heart * soft(y - p["heart_y"] + 0.3, eps)  # flat top: the great vessels continue above
    knob = soft(ellipse_depth(x, y, 0.12, p["heart_y"] - 0.62, 0.075, 0.07), eps)
    # Pleural fluid: a meniscus rising laterally from the dome, of height ``effusion`` (per side).
    rise = np.clip((xi - 0.30) / 0.55, 0.0, 1.0) ** 2
    effusion = soft(y - (y_d - p["effusion"] * rise), eps) * (p["effusion"] > 1e-3)
    lung = thorax * (1 - heart) * (1 - knob) * (1 - effusion)
    return Shapes(body, thorax, 1 - above, heart, knob, effusion, lung, y_d)


# ------------------------------------------------------------------------------------------ layers

Layer = Callable[[Frame, Shapes], np.ndarray]


def soft_tissue(f: Frame, s: Shapes) -> np.ndarray:
    """Body water; the full body depth of water in the heart, the mediastinum and the abdomen below the
    diaphragm; air in the lungs, the trachea and a gastric bubble."""
    mediastinum = soft(0.13 - np.abs(f.x - 0.02), f.eps) * soft(f.y - f.p["clavicle_y"], f.eps)
    mediastinum = mediastinum * soft(f.p["heart_y"] - 0.1 - f.y, f.eps)  # above the heart
    deep = np.maximum(np.maximum(s.below, 0.9 * s.heart), np.maximum(0.7 * mediastinum, 0.8 * s.knob))
    a = (1.0 + 0.5 * deep - 0.62 * s.lung) * s.body
    trachea = soft(0.045 - np.abs(f.x - 0.01), f.eps) * soft(f.p["heart_y"] - 0.62 - f.y, f.eps)
    bubble = soft(ellipse_depth(f.x, f.y, 0.36, f.p["dome_left"] + 0.16, 0.13 * f.p["bubble"] + 1e-3,
                                0.07 * f.p["bubble"] + 1e-3), f.eps)
    return a - 0.45 * trachea * s.body - 0.4 * bubble * s.below * s.body


def hila(f: Frame, s: Shapes) -> np.ndarray:
    """Pulmonary arteries at the hila: soft density fanning into the lungs."""
    y0 = f.p["heart_y"] - 0.38
    d2 = ((f.xi - 0.2) / 0.06) ** 2 + ((f.y - y0) / 0.1) ** 2
    return 0.15 * np.exp(-0.5 * d2) * s.thorax


def texture(f: Frame, s: Shapes) -> np.ndarray:
    """Vascular/lung markings: the image's smooth random field, stronger towards the hila."""
    weight = 0.6 + 0.8 * np.clip(1.0 - (f.xi - 0.1) / 0.7, 0.0, 1.0)
    return 0.07 * f.p["texture"] * weight * s.lung


def ribs(f: Frame, s: Shapes) -> np.ndarray:
    """Posterior ribs (arcs highest mid-hemithorax) and fainter anterior ribs (descending medially)."""
    xi, y, p = f.xi, f.y, f.p
    lateral = np.clip((xi - 0.35) / 0.3, 0.0, 1.0)  # below the diaphragm only the lateral ribs show
    cage = soft(lung_lateral(y, p) + 0.08 - xi, f.eps) * soft(xi - 0.06, f.eps)
    cage = cage * (1 - s.below * (1 - lateral)) * soft(s.dome + 0.3 - y, f.eps)
    spacing = 0.13 * p["rib_spacing"]
    phase = (y - 1.1 * (xi - 0.3) ** 2 - p["rib_tilt"] * xi - p["rib_phase"] + 0.8) / spacing
    k = np.round(phase)
    t = (phase - k) * spacing  # signed distance to the nearest rib centreline
    posterior = band(t, 0.25 * spacing, f.eps) * (k >= 0) * (k <= 10)  # ribs 1-11
    ant_spacing = 1.35 * spacing
    ant_phase = (y + 0.55 * xi - p["rib_phase"] * 1.3 - 0.25) / ant_spacing
    ta = (ant_phase - np.round(ant_phase)) * ant_spacing
    anterior = band(ta, 0.3 * ant_spacing, f.eps) * np.clip((xi - 0.22) / 0.3, 0.0, 1.0)
    return (BONE["posterior_ribs"] * posterior + BONE["anterior_ribs"] * anterior) * cage * s.body


def clavicles(f: Frame, s: Shapes) -> np.ndarray:
    """S-shaped clavicles from the sternal notch up to the shoulders."""
    xi, y = f.xi, f.y
    t = np.clip((xi - 0.08) / 0.75, 0.0, 1.0)
    centre = f.p["clavicle_y"] - 0.17 * t + 0.035 * np.sin(2 * np.pi * t)
    extent = soft(xi - 0.07, f.eps) * soft(0.86 - xi, f.eps)
    return BONE["clavicles"] * band(y - centre, 0.042 - 0.01 * t, f.eps) * extent


def spine(f: Frame, s: Shapes) -> np.ndarray:
    """Vertebral column behind the mediastinum: bodies with dark disc spaces and bright pedicles."""
    x, y, eps = f.x, f.y, f.eps
    period = 0.095 * f.p["rib_spacing"]
    ph = (y - f.p["rib_phase"]) / period
    within = (ph - np.round(ph)) * period  # distance to the vertebra centre
    column = soft(0.075 - np.abs(x), eps) * (
        1 - 0.45 * np.exp(-0.5 * ((np.abs(within) - period / 2) / 0.008) ** 2))
    pedicles = soft(ellipse_depth(np.abs(x), within, 0.05, 0.0, 0.018, 0.026), eps)
    return (BONE["spine"] * column + BONE["pedicles"] * pedicles) * soft(y + 1.1, eps)


def shoulders(f: Frame, s: Shapes) -> np.ndarray:
    """Humeral heads at the upper corners and the faint scapulae over the lateral upper lungs."""
    xi, y, eps = f.xi, f.y, f.eps
    humerus = soft(ellipse_depth(xi, y, 1.0 * f.p["habitus"], -0.8, 0.17, 0.17), eps)
    scapula = soft(xi - (0.66 + 0.18 * (y + 0.75)), eps) * soft(y + 0.78, eps) * soft(-0.05 - y, eps)
    return (BONE["humeri"] * humerus + BONE["scapulae"] * scapula) * s.body


def haze(f: Frame, s: Shapes) -> np.ndarray:
    """Congestion: faint density over the lung bases and around the hila, growing with ``fluid``."""
    basal = soft(f.y - (s.dome - 0.45), np.full_like(f.eps, 0.1))
    perihilar = np.exp(-0.5 * (((f.xi - 0.22) / 0.18) ** 2 + ((f.y - f.p["heart_y"] + 0.3) / 0.25) ** 2))
    return f.p["haze"] * (basal + 0.5 * perihilar) * s.lung


def effusion(f: Frame, s: Shapes) -> np.ndarray:
    """Pleural fluid in the costophrenic angles has soft-tissue density (the lung air is gone there)."""
    return 0.62 * s.effusion * s.thorax * (1 - s.heart)


def nodule(f: Frame) -> np.ndarray:
    """A round soft-tissue density inside one lung (the plain finding)."""
    d2 = (f.x - f.p["nodule_x"]) ** 2 + (f.y - f.p["nodule_y"]) ** 2
    return f.p["nodule_amp"] * np.exp(-0.5 * d2 / f.p["nodule_sigma"] ** 2)


def electrodes(f: Frame, s: Shapes) -> np.ndarray:
    """ECG electrodes (image coordinates): a faint foam pad with a bright metal stud in its centre."""
    p, out = f.p, np.zeros_like(f.x)
    for k in range(p["electrode_on"].shape[1]):  # slots; each drawn only on the images using it
        idx = np.flatnonzero(p["electrode_on"][:, k].reshape(-1) > 0)
        if not len(idx):
            continue
        r = np.sqrt((f.u[idx] - p["electrode_u"][idx, k]) ** 2 + (f.v[idx] - p["electrode_v"][idx, k]) ** 2)
        out[idx] += 0.2 * soft(0.055 - r, f.eps[idx]) + 1.2 * soft(0.018 - r, f.eps[idx])
    return out


def where_flagged(flag: str, draw: Callable[[Frame], np.ndarray]) -> Layer:
    """A layer drawn by ``draw`` only on the images whose parameter ``flag`` is set (zeros elsewhere)."""

    def layer(f: Frame, s: Shapes) -> np.ndarray:
        out = np.zeros_like(f.x)
        idx = np.flatnonzero(f.p[flag].reshape(-1) > 0)
        if len(idx):
            sub = Frame(f.u[idx], f.v[idx], f.x[idx], f.y[idx], f.eps[idx],
                        {k: a[idx] for k, a in f.p.items()})
            out[idx] = draw(sub)
        return out

    return layer


def pacemaker(f: Frame) -> np.ndarray:
    """A pacemaker can under the left clavicle and its lead curving into the heart (``pacemaker_or_icd``)."""
    p, eps = f.p, f.eps
    gx, gy = 0.56, p["clavicle_y"] + 0.12
    can = soft(np.minimum(0.085 - np.abs(f.x - gx), 0.055 - np.abs(f.y - gy)), eps)
    # Lead: a quadratic Bezier from the can through the SVC to the RV apex, sampled at 16 points.
    t = np.linspace(0.0, 1.0, 16)[:, None, None, None]  # [T, 1, 1, 1]
    end = (p["heart_x"] + 0.15, p["heart_y"] + 0.12)
    ctrl = (-0.05, p["heart_y"] - 0.35)
    bx = (1 - t) ** 2 * gx + 2 * t * (1 - t) * ctrl[0] + t ** 2 * end[0]  # [T, N, 1, 1]
    by = (1 - t) ** 2 * gy + 2 * t * (1 - t) * ctrl[1] + t ** 2 * end[1]
    dist = np.sqrt((f.x[None] - bx) ** 2 + (f.y[None] - by) ** 2).min(axis=0)  # [N, H, W]
    lead = soft(0.012 - dist, eps)
    return 2.2 * can + 1.2 * lead


def sternal_wires(f: Frame) -> np.ndarray:
    """Median sternotomy wires: small bright loops down the midline."""
    ys = np.linspace(-0.45, 0.12, 5)[:, None, None, None]  # [K, 1, 1, 1]
    r = np.sqrt((f.x[None] - 0.01) ** 2 / 0.6 + (f.y[None] - f.p["heart_y"] + 0.36 - ys) ** 2)  # [K, N, H, W]
    loops = soft(0.012 - np.abs(r - 0.028), f.eps).sum(axis=0)
    return 1.5 * loops


def marker(f: Frame) -> np.ndarray:
    """A lead side marker in an upper corner (image coordinates): a bright block with a dark letter."""
    p, eps = f.p, f.eps
    du, dv = np.abs(f.u - p["marker_u"]), np.abs(f.v + 0.84)
    block = soft(np.minimum(0.07 - du, 0.08 - dv), eps)
    letter = soft(np.minimum(0.02 - np.abs(f.u - p["marker_u"] + 0.02), 0.05 - dv), eps)
    letter = letter + soft(np.minimum(0.045 - du, 0.015 - np.abs(f.v + 0.79)), eps)
    return 1.6 * np.clip(block - np.clip(letter, 0, 1), 0, 1)


LAYERS: dict[str, Layer] = {
    "anatomy.soft_tissue": soft_tissue,
    "anatomy.hila": hila,
    "texture.markings": texture,
    "bones.ribs": ribs,
    "bones.clavicles": clavicles,
    "bones.spine": spine,
    "bones.shoulders": shoulders,
    "physiology.haze": haze,
    "physiology.effusion": effusion,
    "finding.nodule": where_flagged("nodule", nodule),
    "devices.electrodes": electrodes,
    "devices.pacemaker": where_flagged("pacemaker", pacemaker),
    "devices.sternal_wires": where_flagged("sternal_wires", sternal_wires),
    "devices.marker": where_flagged("marker_on", marker),
}

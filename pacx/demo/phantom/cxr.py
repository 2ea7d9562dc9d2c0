"""Phantom chest radiographs: per-image parameters from the latent and nuisance draws, and the renderer.

:func:`sample_cxr_params` draws the nuisance and copies the physiology from the latent; :func:`render_cxr`,
a pure function of those parameters, returns uint8 images, lung masks and the drawn geometry. The
model: docs/design.md#phantom-render.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from pacx.demo.phantom.anatomy import (
    HEART_TILT,
    LAYERS,
    LUNG_CENTRE,
    LUNG_RADII,
    Frame,
    build_shapes,
    ellipse_depth,
    heart_axes,
    heart_transverse_diameter,
    lung_lateral,
)
from pacx.demo.phantom.latent import column

# Electrode sites (image u, v): below both shoulders and on both flanks, as placed for monitoring.
ELECTRODE_SITES = np.array([(-0.72, -0.55), (0.72, -0.55), (-0.7, 0.62), (0.7, 0.62)])
N_ELECTRODES = len(ELECTRODE_SITES)
TEXTURE_GRID = 9  # coarse grid of the smooth lung-marking field
CHUNK = 64  # images rendered at once
NOISE = "noise"  # pseudo-group: quantum noise (``exclude`` it for a noise-free render)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def fluid_signs(fluid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``fluid`` [N] -> (basal haze attenuation, effusion meniscus height): faint, monotone in fluid; the
    effusion is negligible below ~+1 SD."""
    return 0.04 * softplus(fluid + 0.5), 0.09 * softplus(2.5 * (fluid - 1.0)) / 2.5


def sample_cxr_params(
    rng: np.random.Generator, latent: np.ndarray, nodule: np.ndarray | float = 0.0,
    device_rate: float = 0.06,
) -> dict[str, np.ndarray]:
    """Parameters of ``len(latent)`` images. ``nodule``: bool [N] (which images get one) or a probability.

    ``device_rate`` is the probability of a pacemaker and (separately) of sternotomy wires.
    """
    n = len(latent)

    def u(lo: float, hi: float, *shape: int) -> np.ndarray:  # uniform [n, *shape]
        return rng.uniform(lo, hi, size=(n, *shape))

    def g(sd: float, *shape: int) -> np.ndarray:  # centred normal [n, *shape]
        return rng.normal(0.0, sd, size=(n, *shape))

    fluid = column(latent, "fluid")
    haze, effusion = fluid_signs(fluid)
    insp = g(0.04)
    p = {
        "cardiac_size": column(latent, "cardiac_size"), "fluid": fluid, "haze": haze, "effusion": effusion,
        "rotation": np.deg2rad(np.clip(g(2.5), -6, 6)), "scale": u(0.86, 1.02), "shift_u": g(0.03),
        "shift_v": g(0.025), "habitus": u(0.9, 1.08), "heart_scale": u(0.95, 1.05),
        "heart_x": 0.12 + g(0.015), "heart_y": 0.33 + 0.5 * insp + g(0.02), "dome_right": 0.50 + insp,
        "dome_left": 0.56 + insp + g(0.015), "lung_width": u(0.94, 1.06), "lung_shift": g(0.02),
        "rib_spacing": u(0.93, 1.07), "rib_phase": u(-0.07, 0.07), "rib_tilt": g(0.05),
        "clavicle_y": -0.6 + g(0.03), "bubble": u(0.4, 1.2) * (rng.random(n) < 0.7),
        "kappa": u(0.75, 1.05), "contrast": u(0.85, 1.2), "brightness": g(0.04), "gamma": u(0.8, 1.25),
        "noise": u(0.008, 0.03), "seed": rng.integers(0, 2**31, size=n),
        "electrode_on": (rng.random((n, N_ELECTRODES)) < 0.25).astype(float),
        "electrode_u": ELECTRODE_SITES[:, 0] + g(0.06, N_ELECTRODES),
        "electrode_v": ELECTRODE_SITES[:, 1] + g(0.06, N_ELECTRODES),
        "pacemaker": (rng.random(n) < device_rate).astype(float),
        "sternal_wires": (rng.random(n) < device_rate).astype(float),
        "marker_on": (rng.random(n) < 0.8).astype(float),
        "marker_u": np.where(rng.random(n) < 0.5, -0.82, 0.82),
    }
    present = rng.random(n) < nodule if np.ndim(nodule) == 0 else np.asarray(nodule, bool)
    p.update(place_nodules(rng, p, present))
    return p


def place_nodules(rng: np.random.Generator, p: Mapping[str, np.ndarray], present: np.ndarray) -> dict:
    """Nodule centre (anatomical x, y) inside a lung, clear of the heart; amplitude 0 where absent."""
    n = len(present)
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    apex = LUNG_CENTRE[1] + p["lung_shift"] - LUNG_RADII[1]
    top_dome = np.minimum(p["dome_right"], p["dome_left"])
    y = apex + rng.uniform(0.22, 0.8, n) * (top_dome - apex)
    lateral = lung_lateral(y, {"lung_width": p["lung_width"], "lung_shift": p["lung_shift"]})
    xi = 0.34 + rng.uniform(0.0, 1.0, n) * np.clip(lateral - 0.1 - 0.34, 0.0, None)
    ax, ay = heart_axes(p)
    c, s = np.cos(HEART_TILT), np.sin(HEART_TILT)
    hx, hy = side * xi - p["heart_x"], y - p["heart_y"]
    behind_heart = ellipse_depth(c * hx + s * hy, -s * hx + c * hy, 0.0, 0.0, ax + 0.06, ay + 0.06) > 0
    side = np.where(behind_heart, -1.0, side)  # the right lung is clear of the heart at these xi
    y = np.minimum(y, np.minimum(p["dome_right"], p["dome_left"]) - 0.08)  # above both domes
    return {"nodule": present.astype(float), "nodule_x": side * xi, "nodule_y": y,
            "nodule_sigma": rng.uniform(0.04, 0.06, n), "nodule_amp": present * rng.uniform(0.4, 0.7, n)}


@dataclass
class CXRBatch:
    """Rendered images, their lung masks and the drawn geometry (pixels, per image [N])."""

    images: np.ndarray  # uint8 [N, S, S]
    lungs: np.ndarray  # uint8 [N, S, S], 1 = lung
    geometry: dict[str, np.ndarray]


def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """[size, grid] linear interpolation weights from a coarse grid spanning the image to pixel centres."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    w = pos - lo
    m = np.zeros((size, grid))
    m[np.arange(size), lo] = 1 - w
    m[np.arange(size), lo + 1] = w
    return m


def _random_fields(seeds: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image: a smooth unit-variance texture field and white noise, both float32 [N, S, S]."""
    up = _upsample_matrix(size, TEXTURE_GRID)
    texture, noise = [], []
    for seed in seeds:
        rng = np.random.default_rng(int(seed))
        coarse = rng.standard_normal((TEXTURE_GRID, TEXTURE_GRID))
        field = up @ coarse @ up.T
        texture.append(field / (field.std() + 1e-6))
        noise.append(rng.standard_normal((size, size)))
    return np.asarray(texture, np.float32), np.asarray(noise, np.float32)


def _keep(name: str, exclude: Collection[str]) -> bool:
    return name not in exclude and name.split(".")[0] not in exclude


def _frame(p: Mapping[str, np.ndarray], size: int, texture: np.ndarray) -> Frame:
    grid = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1)
    v, u = np.meshgrid(grid, grid, indexing="ij")  # [S, S]
    b = {k: np.asarray(a, np.float32).reshape(len(a), *np.shape(a)[1:], 1, 1)
         for k, a in p.items() if k != "seed"}
    du, dv = u[None] - b["shift_u"], v[None] - b["shift_v"]  # [N, S, S]
    c, s = np.cos(b["rotation"]), np.sin(b["rotation"])
    x = (c * du + s * dv) / b["scale"]
    y = (-s * du + c * dv) / b["scale"]
    eps = 0.7 * (2.0 / size) / b["scale"]
    n = len(x)
    return Frame(np.broadcast_to(u, (n, size, size)), np.broadcast_to(v, (n, size, size)), x, y, eps,
                 {**b, "texture": texture})


def render_cxr(params: Mapping[str, np.ndarray], size: int, exclude: Collection[str] = ()) -> CXRBatch:
    """Render every image of ``params`` at ``size`` px. ``exclude``: layer names, layer groups (the part
    before the dot: ``bones``, ``devices``, ``texture``, ``physiology``, ``finding``) or ``"noise"``."""
    n = len(params["seed"])
    images, lungs = np.empty((n, size, size), np.uint8), np.empty((n, size, size), np.uint8)
    layers = [fn for name, fn in LAYERS.items() if _keep(name, exclude)]
    for start in range(0, n, CHUNK):
        p = {k: np.asarray(a)[start:start + CHUNK] for k, a in params.items()}
        texture, noise = _random_fields(p["seed"], size)
        f = _frame(p, size, texture)
        shapes = build_shapes(f)
        atten = sum(layer(f, shapes) for layer in layers)  # [n, S, S]
        b = f.p
        bright = 1.0 - np.exp(-b["kappa"] * np.clip(atten, 0.0, None))
        bright = np.clip((bright - 0.5) * b["contrast"] + 0.5 + b["brightness"], 0.0, 1.0) ** b["gamma"]
        if NOISE not in exclude:
            bright = bright + b["noise"] * noise
        images[start:start + CHUNK] = np.round(np.clip(bright, 0.0, 1.0) * 255).astype(np.uint8)
        lungs[start:start + CHUNK] = shapes.lung > 0.5
    return CXRBatch(images, lungs, geometry(params, size, lungs))


def geometry(p: Mapping[str, np.ndarray], size: int, lungs: np.ndarray) -> dict[str, np.ndarray]:
    """The drawn geometry in pixels: cardiac silhouette width, inner thoracic width (widest lung
    outlines), their ratio (CTR), lung area, nodule centre and radius (NaN without a nodule)."""
    px = np.asarray(p["scale"]) * size / 2  # pixels per anatomical unit
    silhouette = heart_transverse_diameter({k: np.asarray(v) for k, v in p.items()}) * px
    thorax = 2 * (LUNG_CENTRE[0] + LUNG_RADII[0] * np.asarray(p["lung_width"])) * px
    c, s = np.cos(p["rotation"]), np.sin(p["rotation"])
    nx, ny = np.asarray(p["nodule_x"]) * p["scale"], np.asarray(p["nodule_y"]) * p["scale"]
    has = np.asarray(p["nodule"]) > 0
    nu = np.where(has, (c * nx - s * ny + p["shift_u"] + 1) * size / 2 - 0.5, np.nan)
    nv = np.where(has, (s * nx + c * ny + p["shift_v"] + 1) * size / 2 - 0.5, np.nan)
    return {"silhouette_px": silhouette, "thorax_px": thorax, "ctr": silhouette / thorax,
            "lung_area_px": lungs.reshape(len(lungs), -1).sum(axis=1).astype(float),
            "nodule_col": nu, "nodule_row": nv,
            "nodule_radius_px": np.where(has, 2 * p["nodule_sigma"] * px, np.nan)}

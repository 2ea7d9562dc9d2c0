"""Simple synthetic chest-radiograph-like images for tests and benchmarks.

This is only an image *generator*; the release layouts are written by the writers beside it, so the
physiology phantom of the demo can replace these images without touching any layout code.
"""

from __future__ import annotations

import numpy as np


def simple_cxr(rng: np.random.Generator, width: int = 390, height: int = 320,
               frontal: bool = True) -> np.ndarray:
    """A grayscale uint8 [height, width] image: body, two dark lung fields, rib stripes, a heart blob.

    Lateral views are a single lung field. Enough structure for MAE losses to fall; no physiology.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u = (xx - width / 2) / (width / 2)  # [-1, 1]
    v = (yy - height / 2) / (height / 2)
    img = 0.55 + 0.1 * rng.standard_normal() * 0.3 + 0.0 * u
    body = (u / 0.95) ** 2 + (v / 1.1) ** 2 < 1
    img = np.where(body, img + 0.15, 0.05)
    centres = [(-0.42, 0.0), (0.42, 0.0)] if frontal else [(0.0, 0.0)]
    lungs = np.zeros_like(u, dtype=bool)
    for cx, cy in centres:
        sx, sy = rng.uniform(0.28, 0.34), rng.uniform(0.6, 0.7)
        lungs |= ((u - cx) / sx) ** 2 + ((v - cy) / sy) ** 2 < 1
    img = np.where(lungs, img - 0.35, img)
    freq, phase = rng.uniform(14, 20), rng.uniform(0, 2 * np.pi)
    ribs = 0.08 * (np.sin(v * freq + phase + 1.5 * np.abs(u)) > 0.6)
    img = img + np.where(body, ribs, 0.0)
    hx, hy, hr = rng.uniform(0.0, 0.12), rng.uniform(0.15, 0.3), rng.uniform(0.22, 0.3)
    heart = ((u - hx) / hr) ** 2 + ((v - hy) / (hr * 0.8)) ** 2 < 1
    img = np.where(heart & frontal, img + 0.25, img)
    img = img + rng.normal(0, 0.03, size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)

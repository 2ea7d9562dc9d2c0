"""A labelled picture of phantom radiographs (``docs/phantom_grid.png``), for looking at the phantom.

Rows: random patients with all nuisance; one patient with only ``cardiac_size`` varied; one patient with
only ``fluid`` varied; radiographs with a nodule (circled). Rendered at the demo size and shown enlarged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # Agg canvas; no pyplot state
from matplotlib.patches import Circle

from pacx.demo.phantom.cxr import CXRBatch, fluid_signs, render_cxr, sample_cxr_params
from pacx.demo.phantom.latent import LATENT_DIM, sample_latent

COLUMNS = 5
SWEEPS = {"cardiac_size": (-2.0, -1.0, 0.0, 1.0, 2.0), "fluid": (-2.0, 0.0, 1.0, 2.0, 3.0)}


def sweep(rng: np.random.Generator, name: str, values: tuple[float, ...], size: int) -> CXRBatch:
    """One patient (latent 0, one nuisance draw) rendered with ``name`` set to each of ``values``."""
    params = sample_cxr_params(rng, np.zeros((1, LATENT_DIM)), device_rate=0.0)
    params = {k: np.repeat(v, len(values), axis=0) for k, v in params.items()}
    params[name] = np.asarray(values)
    params["haze"], params["effusion"] = fluid_signs(params["fluid"])
    return render_cxr(params, size)


def save_grid(path: str | Path, seed: int = 0, size: int = 64) -> Path:
    """Render the grid to ``path`` (PNG) and return it."""
    rng = np.random.default_rng(seed)
    random = render_cxr(sample_cxr_params(rng, sample_latent(rng, COLUMNS), nodule=0.0), size)
    nodules_params = sample_cxr_params(rng, sample_latent(rng, COLUMNS), nodule=np.ones(COLUMNS, bool))
    nodules = render_cxr(nodules_params, size)
    rows = [("random patients", random, [f"CTR {c:.2f}" for c in random.geometry["ctr"]])]
    for name, values in SWEEPS.items():
        batch = sweep(rng, name, values, size)
        rows.append((f"{name} only", batch, [f"{name} {v:+.0f} SD" for v in values]))
    rows.append(("nodule (circled)", nodules, ["nodule"] * COLUMNS))
    fig = Figure(figsize=(2.2 * COLUMNS, 2.45 * len(rows)))
    axes = fig.subplots(len(rows), COLUMNS)
    for r, (title, batch, labels) in enumerate(rows):
        for c in range(COLUMNS):
            ax = axes[r, c]
            ax.imshow(batch.images[c], cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
            ax.set_title(labels[c], fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if batch is nodules:
                g = batch.geometry
                ax.add_patch(Circle((g["nodule_col"][c], g["nodule_row"][c]), 2.2 * g["nodule_radius_px"][c],
                                    fill=False, color="red", lw=1.2))
        axes[r, 0].set_ylabel(title, fontsize=10)
    fig.suptitle(f"PaCX phantom chest radiographs ({size} px, seed {seed})", fontsize=12)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path

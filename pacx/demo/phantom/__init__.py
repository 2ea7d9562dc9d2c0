"""PaCX physiology phantom: synthetic patients whose physiology shows subtly on the chest radiograph and
clearly in the ECG and labs, written in the real release layouts for every stage of the demo.

``latent`` (the physiological latent, echo labels), ``anatomy`` / ``cxr`` (the radiograph renderer),
``physio`` (ECG and labs), ``releases`` / ``generate`` (the releases, size presets; ``python -m
pacx.demo.phantom``), ``grid`` (``docs/phantom_grid.png``). The model: docs/design.md#demo-phantom.
"""

from pacx.demo.phantom.cxr import CXRBatch, render_cxr, sample_cxr_params
from pacx.demo.phantom.generate import PRESETS, generate_phantom
from pacx.demo.phantom.latent import CORRELATION, LATENT_NAMES, echo_labels, sample_latent
from pacx.demo.phantom.releases import RELEASES, PhantomSizes

__all__ = [
    "CORRELATION", "CXRBatch", "LATENT_NAMES", "PRESETS", "RELEASES", "PhantomSizes", "echo_labels",
    "generate_phantom", "render_cxr", "sample_cxr_params", "sample_latent",
]

"""PaCX physiology phantom: synthetic patients whose physiology shows subtly on the chest radiograph and
clearly in the ECG and labs, written in the real release layouts for every stage of the demo.

- ``latent``: the named physiological latent (cardiac size, LV hypertrophy, fluid, heart rate, renal
  function), its correlations and the echo-style labels derived from it.
- ``anatomy`` / ``cxr``: the radiograph renderer (bones, lungs, heart, diaphragm, devices; pose,
  exposure and noise) with lung masks and drawn geometry.
- ``physio``: ECG (the beat model of ``pacx.testing.symile``) and labs driven by the latent.
- ``releases`` / ``generate``: the releases (CheXpert, Symile-MIMIC, CheXchoNet, COVID-QU-Ex lungs,
  Shenzhen-layout nodules) through the existing writers, with size presets; ``python -m
  pacx.demo.phantom`` is the command line, ``grid`` renders the picture in ``docs/phantom_grid.png``.
"""

from pacx.demo.phantom.cxr import CXRBatch, render_cxr, sample_cxr_params
from pacx.demo.phantom.generate import PRESETS, generate_phantom
from pacx.demo.phantom.latent import CORRELATION, LATENT_NAMES, echo_labels, sample_latent
from pacx.demo.phantom.releases import RELEASES, PhantomSizes

__all__ = [
    "CORRELATION", "CXRBatch", "LATENT_NAMES", "PRESETS", "RELEASES", "PhantomSizes", "echo_labels",
    "generate_phantom", "render_cxr", "sample_cxr_params", "sample_latent",
]

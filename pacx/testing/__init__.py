"""Test fixtures as a library (as ``numpy.testing`` / ``torch.testing``): tiny synthetic releases written in
the official layouts, for the tests, the ``scripts/benchmark_*.py`` timings and the demo's phantom.

- :mod:`pacx.testing.images`: simple chest-radiograph-like images (``simple_cxr``).
- :mod:`pacx.testing.chexpert`: a CheXpert-v1.0-small release (Stage 1).
- :mod:`pacx.testing.symile`: a Symile-MIMIC ``data_npy/`` tree (Stage 2; the ECG beat model).
- :mod:`pacx.testing.benchmarks` / :mod:`pacx.testing.seg_benchmarks`: the classification and segmentation
  benchmark releases (Stage 3), ``RELEASE_WRITERS`` / ``SEG_RELEASE_WRITERS`` by registry name.

Nothing here is used by training; the physiology phantom (:mod:`pacx.demo.phantom`) writes its releases
through these writers.
"""

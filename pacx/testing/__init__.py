"""Test fixtures as a library (as ``numpy.testing`` / ``torch.testing``): tiny synthetic releases written in
the official layouts, for the tests, the ``scripts/benchmark_*.py`` timings and the demo's phantom.

:mod:`~pacx.testing.images` (``simple_cxr``), :mod:`~pacx.testing.chexpert` (Stage 1),
:mod:`~pacx.testing.symile` (Stage 2), :mod:`~pacx.testing.benchmarks` and :mod:`~pacx.testing.seg_benchmarks`
(Stage 3: ``RELEASE_WRITERS`` / ``SEG_RELEASE_WRITERS`` by registry name). Nothing here is used by training.
"""

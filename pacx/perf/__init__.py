"""Throughput timing, one place: :mod:`pacx.perf.train` (MFU, the Hugging Face ViTMAE twin, interleaved
step timing; the analytic FLOPs come from :mod:`pacx.models.flops`), used by ``scripts/benchmark_train.py``
and the ``--estimate`` of ``scripts/reproduce_paper.py``; :mod:`pacx.perf.fit` (the throughput of a real
``fit``, as a callback), used by ``scripts/benchmark_fit.py`` (docs/performance.md)."""

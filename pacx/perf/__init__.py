"""Throughput timing, one place: :mod:`pacx.perf.train` (analytic MAE FLOPs and MFU, the Hugging Face
ViTMAE twin, interleaved step timing), used by ``scripts/benchmark_train.py`` and the ``--estimate`` of
``scripts/reproduce_paper.py`` (docs/performance.md)."""

"""Converters (official release -> manifests) for the downstream benchmarks of ``pacx.data.registry``."""

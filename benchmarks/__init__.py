"""Benchmarks for prelabel; run them from the repository root (``python -m benchmarks.throughput``)."""

"""Benchmark scripts (``python -m qtune.bench.<name>``): they print numbers, they assert nothing."""

"""Benchmark scripts (`python experiments/benchmarks/NAME.py`); the tests import them as modules."""

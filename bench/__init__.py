"""Benchmarks: `python -m bench.<name>` (make bench-*); results in docs/results/."""

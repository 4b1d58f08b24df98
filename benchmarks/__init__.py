"""Measurements, run from a checkout: `python -m benchmarks.<name> --help` (docs/measurements.md)."""

"""Benchmarks harness: streamconv against a plain copy and the naive in-RAM converter (`python -m benchmarks`)."""

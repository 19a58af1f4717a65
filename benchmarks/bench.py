"""Benchmarks (not tests): see benchmarks/README.md."""

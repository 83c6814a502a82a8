"""Benchmarks: each prints JSON and compares with a baseline or a physical bound in the same run."""

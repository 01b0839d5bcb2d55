"""Benchmarks: each module prints a rich table of timings; none runs in the test suite."""

"""Benchmarks (`make bench`, `python -m bench [NAME ...]`); not part of CI.

Timing claims live here, never in tests: a test must not fail on a slow machine.
"""

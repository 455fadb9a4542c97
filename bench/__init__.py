"""Benchmarks (`make bench`, `python -m bench [NAME ...]`); not part of CI.

Timing claims live here, never in tests (design §9).
"""

"""Benchmarks behind ``edkm bench``: ``edkm bench memory`` (SPEC §5) is :func:`run_memory_benchmark`."""

from __future__ import annotations

from .memory import BenchOptions, format_table, run, run_memory_benchmark

__all__ = ["BenchOptions", "run", "run_memory_benchmark", "format_table"]

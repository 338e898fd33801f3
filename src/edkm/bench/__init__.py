"""Benchmarks behind ``edkm bench``: ``edkm bench memory`` (docs/method.md §5) is :func:`run_memory_benchmark`.

Modules, in the order a run goes through them: :mod:`.configs` (what runs, options, what fits),
:mod:`.measure` (one measurement in a fresh process), :mod:`.distributed` (N ranks, one row per
configuration, computed rank counts), :mod:`.coreml` (the coremltools reference row),
:mod:`.report` (ratios, targets, notes), :mod:`.render` (table, Markdown, JSON) and
:mod:`.memory` (the run itself).
"""

from __future__ import annotations

from edkm.bench.configs import BenchOptions
from edkm.bench.memory import run, run_memory_benchmark
from edkm.bench.render import format_table

__all__ = ["BenchOptions", "run", "run_memory_benchmark", "format_table"]

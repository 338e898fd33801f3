"""The ``coremltools`` row: ``DKMPalettizer`` measured by ``benchmarks/coreml_reference.py``.

``measure_coreml`` there runs one layer of the benchmark's shape in its own process; this module
scales its footprint and seconds by the number of projections, so the row compares with the block
measured for eDKM. Nothing here imports coremltools: a missing file, a missing package or a layer
that cannot fit the memory limit become a row with ``"measured": false`` and an ``error``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from edkm.bench.configs import REPO_ROOT, BenchOptions, GiB, Log
from edkm.bench.measure import wait_for_memory
from edkm.bench.report import error_row

COREML_SCRIPT = REPO_ROOT / "benchmarks" / "coreml_reference.py"


def coreml_estimate_bytes(opts: BenchOptions) -> int:
    """coremltools' peak for one layer: ~20 |W| x |C| fp32 maps (10.9 GB measured at 4096^2, 3 bits)."""
    return 21 * opts.numel * opts.k * 4 + GiB


def load_coreml_reference() -> ModuleType | None:
    """The ``benchmarks/coreml_reference.py`` module, or None when the file is missing."""
    path = COREML_SCRIPT if COREML_SCRIPT.is_file() else Path.cwd() / "benchmarks" / "coreml_reference.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("coreml_reference", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def measure_coremltools(opts: BenchOptions, log: Log = print) -> dict:
    """coremltools DKMPalettizer on one layer of ``shape``, multiplied by the projection count."""
    ref = load_coreml_reference()
    if ref is None:
        return error_row("coremltools", 1, f"{COREML_SCRIPT} not found")
    p = opts.projections
    need = coreml_estimate_bytes(opts)
    if need > opts.memory_limit_gib * GiB:
        return error_row(
            "coremltools",
            1,
            f"not measured: one layer needs ~{need / GiB:.1f} GiB, over the {opts.memory_limit_gib:g} GiB memory limit",
        )
    wait_for_memory(need, log)
    try:
        r = ref.measure_coreml(tuple(opts.shape), opts.bits, dtype="bfloat16", timeout=opts.timeout, missing_ok=True)
    except RuntimeError as err:
        return error_row("coremltools", 1, str(err))
    if not r.get("measured"):
        return {**r, "config": "coremltools", "ranks": 1, "measured": False}
    fp = r.get("saved_bytes_new", r["footprint_bytes"]) * p  # leaf weight and input not counted, as ours
    first = r.get("first_step_seconds")
    return {
        "config": "coremltools",
        "ranks": 1,
        "measured": True,
        "footprint_bytes": fp,
        "device_bytes": fp,
        "host_bytes": 0,
        "copied_bytes": 0,
        "peak_rss_bytes": r["peak_rss_bytes"],
        "seconds": r["seconds"] * p,
        "first_step_seconds": first * p if first is not None else None,
        "cpu_seconds": r["cpu_seconds"] * p if r.get("cpu_seconds") is not None else None,
        "loadavg_1min": r.get("loadavg_1min"),
        "mode": f"one {opts.shape[0]}x{opts.shape[1]} layer measured, x{p} for the block",
        "coremltools_version": r.get("coremltools_version"),
        "layer": r,
    }

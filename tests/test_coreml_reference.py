"""The coremltools DKM reference measurement (benchmarks/coreml_reference.py) on a tiny layer.

Skipped unless coremltools (optional ``bench`` extra) is installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "coreml_reference.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("coreml_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_coremltools_is_a_clear_error(monkeypatch):
    ref = _load_module()
    monkeypatch.setattr(ref, "coremltools_available", lambda: False)
    with pytest.raises(ref.CoremlToolsUnavailable, match="coremltools is not installed"):
        ref.measure_coreml((64, 64), 3)
    err = ref.measure_coreml((64, 64), 3, missing_ok=True)
    assert err["config"] == "coremltools" and err["measured"] is False and "error" in err


def test_tiny_layer_measurement_is_sane():
    pytest.importorskip("coremltools.optimize.torch.palettization")
    ref = _load_module()
    shape, bits, batch = (64, 48), 3, 4
    r = ref.measure_coreml(shape, bits, batch, timeout=600)

    assert r["config"] == "coremltools" and r["ranks"] == 1 and r["measured"] is True
    assert r["shape"] == list(shape) and r["bits"] == bits and r["dtype"] == "bfloat16"
    assert isinstance(r["coremltools_version"], str) and r["coremltools_version"]
    for key in ("footprint_bytes", "device_bytes", "host_bytes", "copied_bytes", "peak_rss_bytes"):
        assert isinstance(r[key], int) and r[key] >= 0, key
    assert r["host_bytes"] == 0 and r["copied_bytes"] == 0
    assert r["device_bytes"] == r["footprint_bytes"]
    # DKM keeps several (weights x 2**bits) tensors per iteration for backward: well above the
    # weight itself, far below anything absurd.
    n = shape[0] * shape[1]
    assert r["dkm_iterations"] >= 1
    assert 2 * n * 2**bits <= r["footprint_bytes"] < 1000 * n * 2**bits
    assert r["saved_bytes_params_and_input"] >= batch * shape[1] * 2  # the bf16 input is saved
    assert 50 * 2**20 < r["peak_rss_bytes"] < 4 * 2**30  # a python + torch process
    assert r["first_step_peak_rss_bytes"] > 0
    for key in ("seconds", "first_step_seconds"):
        assert math.isfinite(r[key]) and 0 < r[key] < 300, key
    json.dumps(r)  # JSON-serialisable as is


def test_cli_prints_json():
    pytest.importorskip("coremltools.optimize.torch.palettization")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "32", "64", "--bits", "2", "--no-first-step"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert r["measured"] is True and r["shape"] == [32, 64] and r["bits"] == 2
    assert r["first_step_seconds"] is None and r["footprint_bytes"] > 0

"""`edkm bench generate`: the measurement itself on the bundled model, targets and table from rows."""

import json

import pytest

from edkm.bench import generate, generate_child
from edkm.cli.bench import cmd_bench_generate
from edkm.cli.main import build_parser
from edkm.kernels import gemv, linear


def row(config, tok_s, weight_bytes, load_peak, file_bytes):
    return {
        "config": config,
        "decode_tokens_per_second": tok_s,
        "weight_bytes": weight_bytes,
        "load_peak_rss_bytes": load_peak,
        "file_bytes": file_bytes,
        "load_seconds": 0.1,
        "warmup_seconds": 1.0,
        "ttft_seconds": 0.5,
        "loadavg_1min": 1.0,
    }


def test_targets_and_markdown_from_rows():
    model = {
        "params": 1000,
        "largest_weight_fp32_bytes": 400,
        "results": [
            row("fp32", 10.0, 4000, 100, 4000),
            {**row("packed3", 9.0, 1000, 500, 375), "logits_rel_error_gemv": 1e-7, "logits_rel_error_prefill": 0.0},
            {"config": "packed4", "error": "killed"},
        ],
    }
    checks = generate.targets(model)
    assert list(checks) == ["packed3"]
    assert checks["packed3"]["decode vs fp32 >= 0.8"] == {"value": 0.9, "met": True}
    assert checks["packed3"]["weights vs fp32 <= 0.25"]["met"]
    assert checks["packed3"]["load peak <= file + largest weight fp32"] == {"value": 500, "limit": 775, "met": True}
    result = {
        "models": {"m": model},
        "targets": {"m": checks},
        "threads": 1,
        "prompt_tokens": 8,
        "new_tokens": 2,
        "command": "edkm bench generate",
        "date": "today",
    }
    md = generate.format_markdown(result)
    assert "| packed3 |" in md and "0.90x" in md and "error: 'killed'" in md and "1 thread per process" in md


def test_parser_and_bad_subsets():
    args = build_parser().parse_args(["bench", "generate", "--models", "stories260k", "--configs", "fp32,packed3"])
    assert args.func is cmd_bench_generate and args.out == "runs/bench/generate.json"
    with pytest.raises(ValueError, match="unknown configuration"):
        generate.subset("fp32,fast", generate.CONFIGS, "configuration")


def test_measure_packed_bundled_model_eager(tmp_path, monkeypatch):
    """One packed measurement in this process (eager kernel: no compile in the default suite)."""
    monkeypatch.setattr(linear, "fused_gemv", lambda: gemv.FusedGemv(enabled=False))  # off here only: the cache stays
    info = generate_child.prepare(
        {"model": "stories260k", "dir": str(tmp_path), "packed": [[3, None, "p3.safetensors"]]}
    )
    assert info["file_bytes"]["p3.safetensors"] < info["file_bytes"]["dense"] / 6
    spec = {
        "kind": "packed",
        "path": str(tmp_path / "p3.safetensors"),
        "dtype": None,
        "kernel": None,
        "prompt_tokens": 70,
        "new_tokens": 3,
        "threads": 1,
        "seed": 0,
    }
    result = generate_child.measure(spec)
    json.dumps(result)
    assert result["whole_weight_decodes"] == 0  # no LUT layer decoded its whole weight while generating
    assert result["logits_rel_error_gemv"] <= 1e-5 and result["logits_rel_error_prefill"] <= 1e-5
    assert result["weight_bytes_by_dtype"]["uint8"] > 0.9 * info["params"]  # 1 byte per clustered weight
    assert result["decode_tokens_per_second"] > 0 and result["ttft_seconds"] > 0

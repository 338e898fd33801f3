"""`edkm bench generate`: the measurement itself on the bundled model, targets and table from rows."""

import json

import pytest

from edkm.bench import generate, generate_child
from edkm.cli.bench import cmd_bench_generate
from edkm.cli.main import build_parser
from edkm.kernels import gemv, linear, native


def row(config, tok_s, weight_bytes, load_peak, file_bytes, threads=1, prefill=100.0):
    return {
        "config": config,
        "threads": threads,
        "decode_tokens_per_second": tok_s,
        "prefill_tokens_per_second": prefill,
        "weight_bytes": weight_bytes,
        "load_peak_rss_bytes": load_peak,
        "file_bytes": file_bytes,
        "bytes_per_token": weight_bytes,
        "ceiling_tokens_per_second": 4 * tok_s,
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
            row("llamacpp-q4_1", 30.0, 600, 700, 600),
            {
                **row("packed3", 45.0, 460, 500, 375, prefill=150.0),
                "logits_rel_error_gemv": 1e-7,
                "logits_rel_error_prefill": 0.0,
                "rounds_decode_tokens_per_second": [44.0, 45.0],
            },
            row("packed4", 20.0, 1000, 500, 500, threads=2),  # no fp32 row at 2 threads: not judged
            {"config": "packed3-e8", "threads": 1, "error": "killed"},
        ],
    }
    checks = generate.targets(model)
    assert list(checks) == ["packed3 x1"]
    c = checks["packed3 x1"]
    assert c["decode >= llama.cpp Q4_1"] == {"value": 1.5, "met": True}
    assert c["decode >= 4x fp32"] == {"value": 4.5, "met": True}
    assert c["prefill >= fp32"] == {"value": 1.5, "met": True}
    assert c[">= 25% of ceiling"] == {"value": 0.25, "met": True}
    assert c["weights <= (3.00+0.2)/32 of fp32"] == {"value": 0.115, "limit": 0.1, "met": False}
    assert c["load peak <= file + 10%"]["met"] is False
    result = {
        "models": {"m": model},
        "targets": {"m": checks},
        "read_bandwidth": {"1": 2e10},
        "threads": [1, 2],
        "rounds": 2,
        "prompt_tokens": 8,
        "new_tokens": 2,
        "command": "edkm bench generate",
        "date": "today",
    }
    md = generate.format_markdown(result)
    assert "| packed3 | 1 |" in md and "4.50x" in md and "1.50x" in md and "45.0 (44.0-45.0)" in md
    assert "error: 'killed'" in md and "20.0 GB/s at 1 thread" in md and "25%" in md


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
        "runtime": "hf",
        "prompt_tokens": 70,
        "new_tokens": 3,
        "threads": 1,
        "seed": 0,
    }
    result = generate_child.measure(spec)
    json.dumps(result)
    assert result["whole_weight_decodes"] == 0  # no LUT layer decoded its whole weight while generating
    assert result["logits_rel_error_gemv"] <= 1e-5 and result["logits_rel_error_prefill"] <= 1e-5
    packed = result["weight_bytes_by_dtype"]["uint8"]  # bit-packed rows: 3/8 byte per weight + row padding
    assert 0.9 * 3 / 8 * info["params"] < packed < 0.55 * info["params"]  # 64-wide 3-bit rows take 32 bytes for 24
    assert result["decode_tokens_per_second"] > 0 and result["ttft_seconds"] > 0
    assert result["bytes_per_token"] > 0 and result["prefill_tokens_per_second"] > 0


def test_measure_packed_bundled_model_lean(tmp_path):
    """The lean decode path's measurement: logits against decode-then-matmul, no whole-weight decode."""
    generate_child.prepare({"model": "stories260k", "dir": str(tmp_path), "packed": [[4, None, "p4.safetensors"]]})
    spec = {
        "kind": "packed",
        "path": str(tmp_path / "p4.safetensors"),
        "dtype": None,
        "kernel": None,
        "runtime": "lean",
        "prompt_tokens": 64,
        "new_tokens": 4,
        "threads": 1,
        "seed": 0,
    }
    result = generate_child.measure(spec)
    assert result["whole_weight_decodes"] == 0
    assert result["logits_rel_error_gemv"] <= 1e-5 and result["logits_rel_error_prefill"] <= 1e-5
    assert result["native_step"] == native.available()
    assert result["weight_bytes"] >= result["weight_bytes_at_load"]  # the lean model's fused weights counted

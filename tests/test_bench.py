"""`edkm bench memory` machinery on a small layer (256 x 256, one projection, 2 ranks, no coremltools)."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from edkm.bench import BenchOptions, format_table, run
from edkm.bench.configs import Skipped, choose_units, command_line, options_from_args
from edkm.bench.render import write_outputs
from edkm.bench.report import row_key

KEYS = (
    "config",
    "ranks",
    "measured",
    "footprint_bytes",
    "device_bytes",
    "host_bytes",
    "copied_bytes",
    "peak_rss_bytes",
    "seconds",
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "memory.json"
    # single-process configs in this process (fast); sharded ones still launch real gloo ranks
    opts = BenchOptions(shape=(256, 256), projections=1, ranks=[2], coreml=False, isolate=False, out=str(out))
    result = run(opts, log=lambda msg: None)
    write_outputs(result, opts)
    return result, out


def test_json_shape_and_fields(small):
    result, out = small
    on_disk = json.loads(out.read_text())
    assert on_disk["shape"] == [256, 256] and on_disk["bits"] == 3
    assert on_disk["projections"] == 1 and on_disk["iters"] == 3
    for key in ("results", "ratios", "machine", "torch", "note"):
        assert key in on_disk
    rows = {row_key(r): r for r in on_disk["results"]}
    assert set(rows) == {"plain", "save_on_cpu", "M", "M+U", "M+S@2", "M+S@8", "M+U+S@2", "M+U+S@8", "fused"}
    for key, r in rows.items():
        assert all(k in r for k in KEYS), key
        assert "error" not in r, r.get("error")
        assert r["footprint_bytes"] == r["device_bytes"] + r["host_bytes"]
        if r["measured"]:
            assert r["peak_rss_bytes"] > 0 and r["seconds"] > 0 and r["finite_gradients"], key
    assert rows["M+U+S@8"]["measured"] is False and rows["M+S@8"]["measured"] is False
    assert rows["M+U+S@2"]["measured"] is True and rows["M+U+S@2"]["ranks_identical_gradients"]
    md = out.with_suffix(".md").read_text()
    assert "edkm bench memory --shape 256 256 --projections 1 --ranks 2 --no-coreml" in md
    assert "| M+U+S | 8 (computed) |" in md


def test_footprints_in_the_expected_order(small):
    result, _ = small
    fp = {row_key(r): r["footprint_bytes"] for r in result["results"]}
    r = result["ratios"]
    assert fp["fused"] < fp["M+U+S@8"] <= fp["M+U+S@2"] < fp["M+U"] < fp["M+S@2"] < fp["M"] <= fp["plain"]
    assert fp["M+S@8"] < fp["M+S@2"]
    assert fp["save_on_cpu"] > 1.4 * fp["M"]  # save_on_cpu copies every view of A again
    assert r["fused"] > r["M+U+S@8"] >= r["M+U+S@2"] > r["M+U"] > 1 and r["save_on_cpu"] < 1
    assert r["M+S@2"] == pytest.approx(2, rel=1e-3)  # the saved maps, halved


def test_techniques_are_what_they_claim(small):
    result, _ = small
    rows = {row_key(r): r for r in result["results"]}
    plain, m, mu, mus2, mus8 = (rows[k] for k in ("plain", "M", "M+U", "M+U+S@2", "M+U+S@8"))
    assert plain["host_bytes"] == 0 and m["device_bytes"] == 0 and m["host_bytes"] == m["copied_bytes"]
    assert m["referenced"] > 0  # views of stored tensors answered by reference
    assert mu["kinds"]["index"] == 256 * 256 * 2  # one int16 index per weight
    assert mus2["kinds"]["index"] == mu["kinds"]["index"] // 2 and mus8["kinds"]["index"] == mu["kinds"]["index"] // 8
    assert mus2["kinds"]["rows"] == mus8["kinds"]["rows"] == mu["kinds"]["rows"]
    # every M/U/S run computes bit-identical outputs and gradients; fused to float tolerance
    for key in ("save_on_cpu", "M", "M+U", "M+S@2", "M+U+S@2"):
        assert rows[key]["grad_sum"] == plain["grad_sum"], key
    assert rows["fused"]["grad_abs_sum"] == pytest.approx(plain["grad_abs_sum"], rel=1e-2)
    names = result["targets"]
    assert names["M+U footprint >= 16.4x smaller than plain"]["met"] is True
    assert names["fused footprint >= 1000x smaller than plain"]["met"] is True


def test_table_and_options():
    opts = options_from_args(Namespace(shape=[64, 32], bits=2, out="r/m.json", no_coreml=True))
    assert opts.shape == (64, 32) and opts.k == 4 and opts.iters == 3 and opts.ranks == [2, 4]
    assert "coremltools" not in opts.configs
    assert command_line(opts) == "edkm bench memory --shape 64 32 --bits 2 --no-coreml --out r/m.json"
    with pytest.raises(ValueError, match="unknown benchmark config"):
        BenchOptions(configs="plain,M+X")
    text = format_table(
        {
            "results": [
                {
                    "config": "plain",
                    "ranks": 1,
                    "measured": True,
                    "footprint_bytes": 2 << 20,
                    "device_bytes": 2 << 20,
                    "host_bytes": 0,
                    "copied_bytes": 0,
                    "peak_rss_bytes": 300 << 20,
                    "seconds": 1.5,
                    "mode": "block",
                }
            ]
        }
    )
    assert "config" in text.splitlines()[0] and "plain" in text.splitlines()[2]


def test_memory_limit_picks_per_projection_or_skips():
    opts = BenchOptions()  # 4 x 4096 x 4096, 3 bits
    assert choose_units("plain", opts)[0] == "per_projection"  # ~4.3 GB saved per projection
    assert choose_units("M+U", opts) == ("block", [[0, 1, 2, 3]])
    assert choose_units("fused", opts)[0] == "block"
    with pytest.raises(Skipped, match="memory limit"):
        choose_units("plain", BenchOptions(memory_limit_gib=1))

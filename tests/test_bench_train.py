"""`edkm bench train`: rows, ratios, targets, README section; one tiny real run (slow)."""

from __future__ import annotations

import json
import types

import pytest

from edkm.bench.train import model_dims, summarize, weight_shapes
from edkm.bench.train_render import format_markdown, replace_section, write_result
from edkm.cli.main import main


def test_default_dims_are_llama_7b_layers():
    args = types.SimpleNamespace(hidden=4096, intermediate=None, heads=None, layers=1, vocab=32000, batch=1, seq=512)
    d = model_dims(args)
    assert (d["intermediate"], d["heads"]) == (11008, 32)
    assert sum(n for _, n, _ in weight_shapes(d)) == 2 * 32000 * 4096 + 4 * 4096**2 + 3 * 4096 * 11008


def test_ratios_targets_and_readme_section(tmp_path):
    rows = [
        {"config": "plain", "measured": True, "peak_above_start_bytes": 100, "step_seconds": 2.0},
        {
            "config": "edkm-auto",
            "measured": True,
            "peak_above_start_bytes": 105,
            "step_seconds": 3.2,
            "phase_seconds": {"forward": 1.0, "backward": 2.0, "optimizer": 0.2},
        },
        {
            "config": "coremltools DKMPalettizer, whole model",
            "measured": False,
            "peak_above_start_bytes": 10**9,
            "step_seconds": 400.0,
            "note": "computed",
        },
    ]
    targets = summarize(rows, {})
    assert [t["met"] for t in targets] == [True, False]  # 1.05x memory, 1.6x time
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- train table -->\nold\n<!-- /train table -->\nend\n")
    write_result({"rows": rows, "targets": targets}, tmp_path / "r" / "train.json", readme)
    text = readme.read_text()
    assert "old" not in text and "| edkm-auto | yes |" in text and text.endswith("end\n")
    assert "no (computed)" in format_markdown({"rows": rows, "targets": []})
    assert json.loads((tmp_path / "r" / "train.json").read_text())["targets"][1]["met"] is False
    with pytest.raises(ValueError, match="train table"):
        replace_section("no markers", "x")


def test_unknown_row_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "train", "--rows", "plain,bogus", "--out", "/tmp/never.json"])
    assert "unknown rows ['bogus']" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_run_measures_plain_and_edkm(tmp_path):
    out = tmp_path / "train.json"
    main(
        [
            "bench",
            "train",
            "--hidden",
            "64",
            "--vocab",
            "512",
            "--seq",
            "16",
            "--steps",
            "1",
            "--rows",
            "plain,edkm-auto",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    result = json.loads(out.read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert rows["plain"]["measured"] and rows["edkm-auto"]["measured"]
    assert rows["edkm-auto"]["peak_above_start_bytes"] > 0 and rows["edkm-auto"]["tokens_per_second"] > 0
    assert rows["edkm-auto"]["profile_top_ops"]
    assert [t["check"] for t in result["targets"]]


def test_a_real_model_gives_its_own_dims_and_weights(tmp_path):
    from edkm.models import BUNDLED_MODEL_DIR

    args = types.SimpleNamespace(model=str(BUNDLED_MODEL_DIR), batch=2, seq=32)
    d = model_dims(args)
    assert (d["hidden"], d["intermediate"], d["layers"], d["vocab"]) == (64, 172, 5, 512)
    out = tmp_path / "train.json"
    main(["bench", "train", "--model", str(BUNDLED_MODEL_DIR), "--seq", "16", "--steps", "1", "--rows",
          "plain,edkm-auto,edkm-g16-iters0", "--out", str(out), "--device", "cpu"])  # fmt: skip
    result = json.loads(out.read_text())
    assert str(BUNDLED_MODEL_DIR) in result["model"]["arch"]
    assert all(r["measured"] for r in result["rows"] if r["config"] in ("plain", "edkm-auto", "edkm-g16-iters0"))
    assert {r["config"]: r for r in result["rows"]}["plain"]["parameters"] < 300_000  # stories260K, not a random 7B


def test_the_recipe_rows_keep_luts_fixed_and_group_where_rows_divide():
    from edkm.bench.train import spec_for
    from edkm.bench.train_step import recipe_plan
    from edkm.models import load_causal_lm

    model, _ = load_causal_lm(None)  # stories260K: 64-, 32- and 172-row layers
    args = types.SimpleNamespace(model=None, bits=3, embed_bits=8, steps=1)
    plan = recipe_plan(model, spec_for("edkm-g16-iters0", {}, args, "cpu"))
    assert plan.iters == 0 and plan.for_module("model.layers.0.self_attn.q_proj").group_size == 16
    assert plan.for_module("model.layers.0.mlp.gate_proj").group_size is None  # 172 rows: per tensor
    assert plan.for_module("lm_head").bits == 8 and plan.for_module("lm_head").group_size is None
    assert recipe_plan(model, spec_for("edkm-iters0", {}, args, "cpu")).group_size is None
    assert recipe_plan(model, spec_for("edkm-auto", {}, args, "cpu")).iters == 3

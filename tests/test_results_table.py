"""scripts/results_table.py: the SmolLM2 table from a collected run (report + zero-shot scores)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script():
    sys.path.insert(0, str(SCRIPTS))  # results_table imports its sibling doc_sections
    try:
        spec = importlib.util.spec_from_file_location("results_table", SCRIPTS / "results_table.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def test_collect_and_smollm2_table(tmp_path, monkeypatch):
    table = _script()
    run = tmp_path / "run"
    run.mkdir()
    report = {"bits": 3, "plan": {"overrides": {"embed_tokens|lm_head": {"bits": 8}}}, "fp_ppl": 19.26,
              "rtn_ppl": 7911.4, "kmeans_ptq_ppl": 469764.1, "edkm_ppl": 30.5, "gptq_ppl": 495.0}  # fmt: skip
    task = {"acc": 0.5, "acc_norm": 0.6, "acc_norm_stderr": 0.049, "acc_stderr": 0.05, "n": 100}
    bpw = {"3": 3.0, "8": 8.0, "weights": {"3": 300, "8": 100}}
    models = {
        "original": {"tasks": {"piqa": task}, "average": 0.6},
        "edkm": {"tasks": {"piqa": task, "winogrande": {**task, "acc_norm": None}}, "average": 0.55,
                 "bits_per_weight": bpw},
    }  # fmt: skip
    (run / "report.json").write_text(json.dumps(report))
    (run / "zeroshot.json").write_text(json.dumps({"protocol": {}, "models": models}))
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    table.collect(run, tmp_path / "smollm2_3bit.json")
    lines = table.smollm2_table().splitlines()
    rows = {line.split(" | ")[1]: line for line in lines[2:]}
    assert "19.26" in rows["fp32 original (the Q4_1 GGUF, dequantized)"]
    assert "66.9" in rows["published, lm-eval (full sets, third-party)"]
    first = "activation warm start, 3 centroid updates per forward, fine-tuned (packed, reloaded)"
    edkm = rows[f"**eDKM** per tensor, {first}"]
    assert "3.00 / 4.25" in edkm and "60.0 ± 4.9" in edkm and "50.0 ± 5.0" in edkm and "| 55.0 |" in edkm
    assert "469,764.10" in rows["k-means per tensor"] and "GPTQ g128" not in rows  # rows without a figure left out
    grouped = {**report, "plan": {**report["plan"], "group_size": 16}}
    (run / "report.json").write_text(json.dumps(grouped))
    table.collect(run, tmp_path / "smollm2_3bit_g16.json")
    (tmp_path / "smollm2_pipeline.json").write_text("{}")  # not a results table
    labels = [line.split(" | ")[1] for line in table.smollm2_table().splitlines()[2:]]
    assert f"**eDKM** per 16 rows, {first}" in labels
    assert "k-means per 16 rows" in labels
    assert labels.count("k-means per tensor") == 1 and labels.count("GPTQ per channel") == 1  # not repeated


def test_a_file_beside_the_main_run_adds_only_its_edkm_row_named_by_its_recipe(tmp_path, monkeypatch):
    """Another recipe or seed repeats the post-training rows of its bit width: only eDKM's row is new."""
    table = _script()
    run = tmp_path / "run"
    run.mkdir()
    plan = {"overrides": {"embed_tokens|lm_head": {"bits": 8}}, "group_size": 16, "iters": 0}
    report = {"bits": 3, "plan": plan, "fp_ppl": 19.26, "rtn_ppl": 7911.4, "kmeans_ptq_ppl": 2.9e6,
              "edkm_ppl": 64.37, "warm_start": "fisher"}  # fmt: skip
    (run / "report.json").write_text(json.dumps(report))
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    table.collect(run, tmp_path / "smollm2_3bit_g16_fisher.json")
    labels = [line.split(" | ")[1] for line in table.smollm2_table().splitlines()[2:]]
    assert labels == [
        "**eDKM** per 16 rows, Fisher-weighted warm start, LUT fixed (`--iters 0`), fine-tuned (packed, reloaded)"
    ]
    (run / "report.json").write_text(json.dumps({**report, "plan": {**plan, "group_size": None}, "train": {"seed": 1}}))
    table.collect(run, tmp_path / "smollm2_3bit_s1.json")
    labels = [line.split(" | ")[1] for line in table.smollm2_table().splitlines()[2:]]
    seeded = "**eDKM** per tensor, Fisher-weighted warm start, LUT fixed (`--iters 0`), fine-tuned, seed 1"
    assert f"{seeded} (packed, reloaded)" in labels


def test_library_peers_table_states_why_a_row_did_not_run(tmp_path, monkeypatch):
    table = _script()
    bpw = {"3": 3.19, "8": 8.06, "edkm_file": 3.21, "weights": {"3": 300, "8": 100}}
    row = {"label": "GPTQModel GPTQ g128", "library": "gptqmodel 7.6.0", "build_seconds": 612.0,
           "bits_per_weight": bpw, "val_ppl": 20.5, "ppl": 30.25, "zeroshot": {"average": 0.412}}  # fmt: skip
    reason = "GPTQModel 7.6.0's AWQ saves only its 4-bit GEMM format"
    result = {"bits": 3, "rows": {"gptqmodel_gptq_g128": row},
              "unavailable": {"gptqmodel_awq_g128": {"label": "GPTQModel AWQ g128", "reason": reason}}}  # fmt: skip
    (tmp_path / "smollm2_library_peers_3bit.json").write_text(json.dumps(result))
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    lines = table.library_peers_table().splitlines()
    assert "| 3 / 8 | GPTQModel GPTQ g128 | gptqmodel 7.6.0 | 3.19 / 4.41 | 20.50 | 30.25 | 41.2 | 612 s |" in lines
    assert f"| 3 / 8 | GPTQModel AWQ g128 | not run: {reason} | | | | | |" in lines

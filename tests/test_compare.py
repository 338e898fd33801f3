"""`edkm compare` end to end on a small text: JSON rows with bits per weight from the file, targets, table, plot."""

import json

import pytest

from edkm.cli.main import main
from edkm.jobs.compare_report import compare_table, write_plot
from edkm.models import BUNDLED_TEXT

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    text = tmp / "small.txt"
    text.write_text(BUNDLED_TEXT.read_text()[:30_000])
    out = tmp / "results"
    main(
        [
            "compare",
            "--text",
            str(text),
            "--bits",
            "3",
            "--seeds",
            "0",
            "1",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--context",
            "32",
            "--methods",
            "rtn",
            "gptq",
            "squeeze_tensor",
            "coreml_skm_rows",
            "qat_g",
            "edkm",
            "edkm_rows",
            "--qat-lrs",
            "1e-4",
            "1e-3",
            "--edkm-lrs",
            "1e-3",
            "2e-3",
            "--edkm-taus",
            "0.4",
            "--out",
            str(out),
            "--work",
            str(tmp / "work"),
        ]
    )
    return out


def test_compare_json_rows_and_targets(results):
    report = json.loads((results / "compare_3bit.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"fp", "rtn", "gptq", "squeeze_tensor", "coreml_skm_rows", "qat_g", "edkm", "edkm_rows"}
    assert 3.0 < rows["coreml_skm_rows"]["bpw"] < rows["rtn"]["bpw"]  # 8 fp16 entries per 16 rows of 64
    assert rows["squeeze_tensor"]["bpw"] < 3.1 < rows["rtn"]["bpw"]  # one LUT per tensor vs fp16 scale + zero per row
    assert (
        rows["edkm"]["bpw"] < 3.1 and len(rows["edkm"]["test_ppls"]) == 2 and rows["edkm"]["test_ppl_std"] is not None
    )
    assert [t["value"] for t in rows["qat_g"]["tuning"]] == [1e-4, 1e-3]  # chosen on validation
    assert rows["qat_g"]["chosen"] == min(rows["qat_g"]["tuning"], key=lambda t: t["val_ppl"])["value"]
    assert [t["value"] for t in rows["gptq"]["tuning"]] == [0.01, 0.1] and rows["gptq"]["seeds"] is None
    assert report["targets"]["checked"] and "rtn" not in report["targets"]["peers_within_limit"]
    assert [t["value"] for t in rows["edkm"]["tuning"]] == [
        [1e-3, 0.2],
        [2e-3, 0.2],
        [2e-3, 0.4],
    ]  # lrs, then taus at the middle lr
    assert rows["edkm_rows"]["chosen"] == rows["edkm"]["chosen"] and rows["edkm_rows"]["tuned_like"] == "edkm"
    assert set(report["not_run"]) >= {"awq_g", "hqq_g"}
    assert report["protocol"]["test_tokens"] > 0 and report["protocol"]["val_tokens"] > 0


def test_compare_table_and_plot(results):
    table = compare_table(results)
    assert "GPTQ 3-bit per channel" in table and "± " in table and "not run" in table
    png = write_plot(results)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_compare_rejects_unknown_method(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--methods", "gptq", "nope", "--out", str(tmp_path)])
    assert "unknown methods ['nope']" in capsys.readouterr().err

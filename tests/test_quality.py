"""Quality targets of the default job on the bundled stories260K (slow: two full `edkm compress` runs).

bash scripts/test.sh --slow -k quality
"""

import json

import pytest

from edkm.cli.main import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("bits,within", [(3, 0.15), (4, 0.05)])
def test_default_job_reaches_targets(bits, within, tmp_path):
    main(["compress", "--bits", str(bits), "--out", str(tmp_path), "--quiet"])
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["edkm_ppl"] <= (1 + within) * r["fp_finetuned_ppl"]
    assert r["edkm_ppl"] < r["kmeans_ptq_ppl"] and r["edkm_ppl"] < r["rtn_ppl"]

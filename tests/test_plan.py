"""`edkm plan`: per-GPU peaks without weights; consistent across modes and GPU counts; clear errors."""

import json

import pytest

from edkm.cli.main import main
from edkm.jobs.plan import PlanOptions, estimate
from edkm.models import BUNDLED_MODEL_DIR


@pytest.fixture(scope="module")
def plans():
    return {n: estimate(str(BUNDLED_MODEL_DIR), PlanOptions(gpus=n, seq=64, gpu_memory_gib=0.01)) for n in (1, 4)}


def test_modes_are_ordered_as_their_memory(plans):
    peak = {r["mode"]: r["peak_gib"] for r in plans[1]["modes"]}
    assert peak["coremltools"] > 10 * peak["fused"]  # the full |W| x |C| maps dominate
    assert peak["fused"] > peak["plain-ft"]  # fused DKM's tables on top of plain fine-tuning
    host = {r["mode"]: r["host_gib"] for r in plans[1]["modes"]}
    assert host["marshal"] > 0 and host["marshal+unique"] > 0 and host["fused"] == 0  # (tiny weights: U saves little)
    assert host["marshal+shard"] == host["marshal"]  # one GPU: nothing to shard (4 GPUs below)
    assert plans[4]["parts_gib"]["states"] == pytest.approx(plans[1]["parts_gib"]["states"] / 4)
    host4 = {r["mode"]: r["host_gib"] for r in plans[4]["modes"]}
    assert (
        host4["marshal+shard"] < host["marshal+shard"] and host4["marshal+unique+shard"] < host["marshal+unique+shard"]
    )


def test_fused_dkm_costs_tables_per_tensor_not_bytes_per_weight():
    import torch

    from edkm.jobs.plan import dkm_coefficients

    per_w, per_u, per_t, host_w, _, host_t = dkm_coefficients(("fused", "plain-ft"), 8, 3, 1, torch.float32)["fused"]
    assert per_w < 0.05 and 1e5 < per_t < 4e6  # O(65,536) tables whatever the layer size (measured at two sizes)
    assert host_w == host_t == 0


def test_fits_column_follows_the_gpu_memory(plans):
    for r in plans[1]["modes"]:
        assert r["fits"] == (r["peak_gib"] <= 0.01)


def test_cli_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    main(["plan", str(BUNDLED_MODEL_DIR / "config.json"), "--gpus", "2", "--seq", "32", "--json", str(out)])
    assert "| fused |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["options"]["gpus"] == 2 and len(data["modes"]) == 8


def test_unknown_model_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "no-such-model"])
    assert "neither a preset" in capsys.readouterr().err

"""Sharding (S) with real processes: gloo on CPU, 2 and 4 ranks, bit-identical to plain DKM.

Ranks are forked (the parent has imported torch already, so start-up costs no re-import; each
child runs single-threaded, as DataLoader workers do) and report through a queue.
"""

from __future__ import annotations

import pytest
import torch

import edkm
from edkm.memory import parse_memory, track_saved

MODES = ("shard", "unique+shard", "marshal+unique+shard", "marshal+shard")


def _run(w0: torch.Tensor, c: torch.Tensor, g: torch.Tensor, memory: str) -> tuple[list[torch.Tensor], dict]:
    w = w0.clone().requires_grad_()
    with track_saved() as stats:
        out, cn = edkm.dkm(w, c, tau=1e-4, iters=3, memory=memory)
    (out.float() * g).sum().backward()
    return [out, cn, w.grad], stats.as_dict()


def worker(rank: int, world: int, init_file: str) -> dict:
    """One rank: every sharded mode against plain, bit for bit; the bytes each rank holds."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # identical weights on every rank, as under data parallelism
    w16 = (torch.randn(64, 48) * 0.05).bfloat16()
    w32 = torch.randn(64, 48) * 0.05  # not 16-bit: "auto" takes marshal+shard
    c = edkm.kmeans1d(w16.float(), 8)
    g = torch.randn(64, 48)
    result: dict = {"rank": rank, "equal": {}, "stats": {}}
    for w in (w16, w32):
        plain, result["stats"]["plain" if w is w16 else "plain/fp32"] = _run(w, c, g, "plain")
        for mode in MODES if w is w16 else ("shard", "marshal+shard", "auto"):
            got, stats = _run(w, c, g, mode)
            key = mode if w is w16 else f"{mode}/fp32"
            result["equal"][key] = all(torch.equal(a, b) for a, b in zip(plain, got))
            result["stats"][key] = stats
    _, result["stats"]["marshal+unique"] = _run(w16, c, g, "marshal+unique")
    result["auto"] = str(parse_memory("auto").resolve(w32))
    bad = w16.clone()
    if rank == 1:
        bad[0, 0] += 1  # ranks disagree: every rank must refuse, none may hang
    try:
        _run(bad, c, g, "unique+shard")
        result["mismatch"] = "no error"
    except RuntimeError as err:
        result["mismatch"] = str(err)
    dist.destroy_process_group()
    return result


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_shard_bit_identical_and_one_nth(world, launch_ranks):
    for res in launch_ranks(worker, world, timeout=60):
        assert all(res["equal"].values()), res["equal"]
        assert res["auto"] == "marshal+shard"
        stats = res["stats"]
        whole = stats["marshal+unique"]["kinds"]["index"]  # 3072 weights, int16 index
        piece = stats["marshal+unique+shard"]["kinds"]["index"]
        assert piece == -(-whole // 2 // world) * 2  # ceil(L / N) elements, padded
        assert stats["marshal+unique+shard"]["kinds"]["rows"] == stats["marshal+unique"]["kinds"]["rows"]
        maps = stats["plain"]["footprint"]
        assert stats["shard"]["kinds"]["shard"] <= maps / world + 64 * world
        assert "identical weights and centroids on every rank" in res["mismatch"]


def test_shard_without_process_group_is_a_clear_error():
    w = torch.randn(8, 8).bfloat16().requires_grad_()
    with pytest.raises(RuntimeError, match="sharding needs torch.distributed initialised"):
        edkm.dkm(w, torch.linspace(-1, 1, 4), tau=0.01, iters=1, memory="marshal+unique+shard")
    with pytest.raises(RuntimeError, match="sharding needs torch.distributed initialised"):
        edkm.dkm(w.float(), torch.linspace(-1, 1, 4), tau=0.01, iters=1, memory="shard")
    assert str(parse_memory("auto").resolve(torch.randn(8, 8))) == "marshal"  # auto: no group, no shard

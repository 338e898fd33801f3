"""Ranks that disagree all raise the same clear error, none hangs; early stop decided together.

Real gloo processes (forked, file rendezvous: no port to collide on), 2 ranks.
"""

from __future__ import annotations

import pytest
import torch

import edkm
from edkm.cluster.dkm import converged
from edkm.memory.fused import fused_dkm


def _outcome(fn) -> str:
    try:
        fn()
        return "ok"
    except (RuntimeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"


def worker(rank: int, world: int, init_file: str) -> dict:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    w16 = (torch.randn(64, 48) * 0.05).bfloat16().float()  # fp32 holding bf16 values: 16-bit
    odd = w16 + 1e-4 * torch.rand(64, 48) if rank == 1 else w16  # rank 1's weights are not 16-bit
    c = edkm.kmeans1d(w16, 8)[0]
    res: dict = {}
    for mode in ("auto", "fused", "unique+shard", "marshal+unique"):
        res[mode] = _outcome(
            lambda mode=mode: edkm.dkm(odd.clone().requires_grad_(), c, tau=1e-4, iters=2, memory=mode)
        )
    res["agreeing auto"] = _outcome(lambda: edkm.dkm(w16.clone().requires_grad_(), c, tau=1e-4, iters=2, memory="auto"))
    # early stop: rank 0 has converged, rank 1 has not -> nobody stops; both converged -> both stop
    old = torch.zeros(4)
    res["stop one"] = converged(old, old + (0.0 if rank == 0 else 1.0), eps=0.5)
    res["stop all"] = converged(old, old + 0.1, eps=0.5)
    # fused DKM with early stop: same number of updates on every rank although only rank 0 converges at once
    wr = w16 if rank == 0 else w16 * 1.5
    _, cn = fused_dkm(wr, c, tau=1e-4, iters=5, eps=1e-3)
    res["centroids"] = cn.tolist()
    dist.barrier()  # everybody got here: nobody hangs
    dist.destroy_process_group()
    return res


@pytest.mark.distributed
def test_disagreeing_ranks_all_raise_and_early_stop_is_collective(launch_ranks):
    for res in launch_ranks(worker, 2, timeout=90):
        for mode in ("auto", "fused", "unique+shard", "marshal+unique"):
            assert res[mode].startswith("RuntimeError: ranks disagree about the weights"), (mode, res[mode])
        assert res["agreeing auto"] == "ok"
        assert res["stop one"] is False and res["stop all"] is True

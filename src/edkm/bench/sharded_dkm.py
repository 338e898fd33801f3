"""Benchmark: per-rank DKM time and memory, "DKM on the gathered weight" vs "sharded DKM", on gloo ranks.

    edkm bench sharded-dkm --ranks 1 2 4 --out benchmarks/results/fsdp_dkm.json

Under FSDP every rank holds the gathered weight for forward and backward. "gathered" runs the
unique-domain DKM (:func:`edkm.memory.fused.fused_dkm`) on the whole weight on every rank, as
``ClusteredWeight`` does on FSDP's unsharded parameter; "sharded" runs
:func:`edkm.distributed.sharded.sharded_dkm` on the rank's rows (histogram and gradient-bucket
all-reduces included). Both: forward + backward of one weight, rounded to bf16, 3 bits. The
all-gather of the clustered rows for the matmul is not counted (FSDP gathers the weight in both).
Per rank: median wall and CPU seconds of ``--repeats`` runs (CPU seconds are the rank's own work;
wall seconds also count waiting for cores when the ranks outnumber them), and peak RSS above the RSS before the call
(VmHWM reset through /proc/self/clear_refs), the largest over ranks. One thread per rank; the
ranks share this machine's cores, so the 1-minute load average is recorded with the numbers.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from edkm.atomic import write_json
from edkm.distributed.sharded import local_rows, sharded_dkm
from edkm.memory.fused import fused_dkm
from edkm.rss import peak_rss_bytes, reset_peak_rss, rss_bytes


def _one(
    mode: str, w0: torch.Tensor, c0: torch.Tensor, tau: torch.Tensor, iters: int, rank: int, world: int
) -> tuple[float, float, int]:
    rows = w0.shape[0]
    start, end = local_rows(rows, rank, world)
    w = (w0 if mode == "gathered" else w0[start:end]).clone().requires_grad_()
    grad = torch.ones(w.shape)  # stands in for dL/dW_hat
    dist.barrier()
    reset_peak_rss()
    before = rss_bytes() or 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    if mode == "gathered":
        out, _ = fused_dkm(w, c0, tau=tau, iters=iters)
    else:
        out, _ = sharded_dkm(w, c0, tau=tau, iters=iters, row_offset=start, group_rows=rows)
    out.backward(grad)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = peak_rss_bytes() - before
    del out, w, grad
    return seconds, cpu, peak


def _rank(rank: int, world: int, init: str, shape: tuple[int, int], bits: int, iters: int, repeats: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(0)
    w0 = (torch.randn(shape) * 0.02).to(torch.bfloat16).float()  # identical on every rank
    c0 = torch.quantile(
        w0.reshape(-1)[:: max(1, w0.numel() // 100_000)], torch.linspace(0.05, 0.95, 1 << bits)
    ).unsqueeze(0)
    tau = torch.tensor([0.05 * float(torch.diff(c0).square().median())])
    result = {}
    for mode in ("gathered", "sharded"):
        _one(mode, w0, c0, tau, iters, rank, world)  # warm-up
        runs = [_one(mode, w0, c0, tau, iters, rank, world) for _ in range(repeats)]
        result[mode] = {
            "seconds": statistics.median(r[0] for r in runs),
            "cpu_seconds": statistics.median(r[1] for r in runs),
            "peak_bytes": max(r[2] for r in runs),
        }
    queue.put((rank, result))
    dist.destroy_process_group()


def measure(world: int, shape: tuple[int, int], bits: int, iters: int, repeats: int) -> dict:
    """Per-rank figures of both modes on ``world`` gloo processes (spawned here)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_rank, args=(r, world, f"{tmp}/init", shape, bits, iters, repeats, queue))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        per_rank = dict(queue.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join()
    rows = {}
    for mode in ("gathered", "sharded"):
        rows[mode] = {
            key: max(per_rank[r][mode][key] for r in per_rank) for key in ("seconds", "cpu_seconds", "peak_bytes")
        }
    return rows


def markdown(result: dict) -> str:
    """The README table of a result."""
    lines = [
        "| ranks | DKM on the gathered weight: CPU s / wall s / MiB per rank "
        "| sharded DKM: CPU s / wall s / MiB per rank "
        "| CPU time ratio | memory ratio |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        g, s = row["gathered"], row["sharded"]
        lines.append(
            f"| {row['ranks']} | {g['cpu_seconds']:.2f} / {g['seconds']:.2f} / {g['peak_bytes'] / 2**20:.0f} | "
            f"{s['cpu_seconds']:.2f} / {s['seconds']:.2f} / {s['peak_bytes'] / 2**20:.0f} | "
            f"{g['cpu_seconds'] / s['cpu_seconds']:.1f}x | "
            f"{g['peak_bytes'] / max(s['peak_bytes'], 1):.1f}x |"
        )
    return "\n".join(lines)


def run(
    shape: tuple[int, int] = (4096, 4096),
    bits: int = 3,
    iters: int = 3,
    ranks: tuple[int, ...] = (1, 2, 4),
    repeats: int = 3,
    out: str = "benchmarks/results/fsdp_dkm.json",
) -> dict:
    """Gathered vs sharded DKM of one weight at each rank count (real gloo processes); writes ``out``."""
    if max(ranks) > 4 or min(ranks) < 1:
        raise ValueError("--ranks: 1 to 4 processes")
    rows = []
    for world in ranks:
        load = os.getloadavg()[0]
        rows.append(
            {"ranks": world, "load_avg_1min": round(load, 2), **measure(world, tuple(shape), bits, iters, repeats)}
        )
        print(json.dumps(rows[-1]))
    result = {
        "shape": list(shape),
        "bits": bits,
        "iters": iters,
        "repeats": repeats,
        "dtype": "bfloat16 values (fp32 master)",
        "threads_per_rank": 1,
        "rows": rows,
        "note": "seconds / cpu_seconds: wall / process CPU time of forward+backward of one weight, "
        "median over repeats, slowest rank; peak_bytes: "
        "peak RSS above the RSS before the call, largest rank",
    }
    write_json(out, result)
    return result

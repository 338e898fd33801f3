"""``edkm bench kernels``: one-thread LUT GEMV of the native kernel against dense fp32 ``F.linear``, per layer shape.

Two regimes per shape: ``hot`` (the same weight every call: it stays in cache when it fits, dense fp32's best
case) and ``cold`` (calls rotate over copies of the weight totalling >= ``cold_mib`` MiB, so every call reads its
weight from memory, as decoding a whole model does). GB/s counts the bytes a kernel reads (the fp32 weight for
dense; packed rows with their padding plus the table); ``speedup_vs_dense`` = dense time / kernel time.
The default shapes are SmolLM2-135M's: attention 576 x 576, MLP 1536 x 576 and 576 x 1536, the tied head
49,152 x 576.

Example:
    >>> rows = run(shapes=((16, 64),), bits=(3,), rounds=1, cold_mib=1)
    >>> sorted({r["kernel"] for r in rows}), {r["regime"] for r in rows} == {"hot", "cold"}
    (['dense fp32', 'lut 3-bit'], True)
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from edkm.kernels import native

SHAPES = ((576, 576), (1536, 576), (576, 1536), (49152, 576))  # SmolLM2-135M's layers


def best_seconds(fn: Callable[[int], Any], calls: int, rounds: int) -> float:
    """Best of ``rounds`` mean seconds per call over ``calls`` calls (``fn(i)`` gets the call number)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def measure(name: str, nbytes: int, make_copy: Callable[[], Any], call: Callable[[Any], Any], cold_bytes: int,
            rounds: int) -> list[dict[str, Any]]:  # fmt: skip
    """Rows of one kernel in both regimes."""
    rows = []
    for regime in ("hot", "cold"):
        n = 1 if regime == "hot" else max(2, -(-cold_bytes // nbytes))
        copies = [make_copy() for _ in range(n)]
        calls = max(n, min(2000, max(3, int(2e8 // max(1, nbytes)))))  # ~0.2 GB of reads per round
        call(copies[0])  # warm-up
        sec = best_seconds(lambda i, c=copies, n=n: call(c[i % n]), calls, rounds)
        rows.append(
            {"kernel": name, "regime": regime, "ms": sec * 1e3, "weight_bytes": nbytes, "gbps": nbytes / sec / 1e9}
        )
        del copies
    return rows


def bench_shape(rows: int, cols: int, tokens: int, bits: tuple[int, ...], cold_bytes: int, rounds: int) -> list[dict]:
    """Dense fp32 and the native GEMV at each of ``bits`` (one LUT per tensor) for a (rows, cols) weight."""
    module = native.ext()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    results = measure("dense fp32", w.numel() * 4, w.clone, lambda wc: F.linear(x, wc), cold_bytes, rounds)
    for b in bits:
        k = 1 << b
        idx = torch.randint(0, k, (rows, cols), generator=g, dtype=torch.uint8)
        table = torch.randn(1, 1, k, generator=g).half().float()  # a per-tensor LUT of fp16 values, as edkm's
        packed = module.pack_rows(idx, b)

        def gemv(pc: torch.Tensor, b: int = b, table: torch.Tensor = table) -> torch.Tensor:
            return module.gemv(x, pc, table, b, rows, cols, rows, cols, "auto")

        results += measure(f"lut {b}-bit", packed.numel() + table.numel() * 4, packed.clone, gemv, cold_bytes, rounds)
    dense = {r["regime"]: r["ms"] for r in results if r["kernel"] == "dense fp32"}
    return [{"shape": [rows, cols], "tokens": tokens, **r, "speedup_vs_dense": dense[r["regime"]] / r["ms"]}
            for r in results]  # fmt: skip


def run(shapes: tuple[tuple[int, int], ...] = SHAPES, tokens: int = 1, bits: tuple[int, ...] = (3, 4, 8),
        cold_mib: int = 1024, rounds: int = 5) -> list[dict[str, Any]]:  # fmt: skip
    """Every row, measured at one intra-op thread (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [row for r, c in shapes for row in bench_shape(r, c, tokens, bits, cold_mib << 20, rounds)]
    finally:
        torch.set_num_threads(threads)


def result(rows: list[dict[str, Any]], tokens: int, cold_mib: int) -> dict[str, Any]:
    """The JSON document: machine, versions, load and the rows."""
    return {"tokens": tokens, "threads": 1, "torch": torch.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "isas": native.supported_isas(),
            "cold_mib": cold_mib, "load_average_1min": os.getloadavg()[0], "rows": rows}  # fmt: skip


def markdown(doc: dict[str, Any]) -> str:
    """The table: one line per (shape, kernel), hot and cold side by side."""
    lines = [f"T={doc['tokens']}, 1 thread, ISAs {', '.join(doc['isas'])}, load {doc['load_average_1min']:.1f}", "",
             "| shape | kernel | hot ms | hot x dense | cold ms | cold GB/s | cold x dense |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    rows = doc["rows"]
    for hot, cold in zip(rows[::2], rows[1::2]):
        shape = f"{hot['shape'][0]} x {hot['shape'][1]}"
        lines.append(f"| {shape} | {hot['kernel']} | {hot['ms']:.4f} | {hot['speedup_vs_dense']:.2f}x | "
                     f"{cold['ms']:.4f} | {cold['gbps']:.1f} | {cold['speedup_vs_dense']:.2f}x |")  # fmt: skip
    return "\n".join(lines)

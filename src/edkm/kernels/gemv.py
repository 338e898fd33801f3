"""Fused LUT GEMV for a few tokens: decode and multiply in one pass, no weight buffer.

``y[m, g, r] = sum_{b, c} LUT[g, b, idx[g, r, b, c]] * x[m, b, c]`` on the canonical views of
:func:`edkm.kernels.layout.grid`. The LUT is decoded from the index bits with a tree of selects
(``bits`` levels, ``2^bits - 1`` selects, exact: every weight *is* one LUT entry); above
:data:`SELECT_MAX_BITS` a gather from the small LUT is cheaper than the 2^b selects. Written in
plain torch ops: eager it is a slow reference; :func:`fused_gemv` runs it through
``torch.compile`` (Inductor's vectorised C++), where the decoded weight lives only in registers.

Example:
    >>> import torch
    >>> from edkm.kernels.layout import grid
    >>> lut = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=torch.float16)
    >>> idx = torch.tensor([[0, 1, 2, 3, 3, 2]], dtype=torch.uint8)
    >>> g = grid(lut, idx, torch.Size([2, 3]))
    >>> lut_gemv(torch.ones(1, 3), g.indices, g.lut.float())
    tensor([[1.5000, 2.0000]])
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch

SELECT_MAX_BITS = 4
RECOMPILE_LIMIT = 64  # Dynamo's per-function limit is raised to this at the first compile
Gemv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def select_decode(indices: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """LUT values at ``indices`` by a binary tree of selects on the index bits (fp32, broadcast shapes)."""
    k = lut.shape[-1]
    values = [lut[..., j : j + 1] for j in range(k)]
    idx = indices.to(torch.int32)
    bit = 0
    while len(values) > 1:
        on = ((idx >> bit) & 1) != 0
        values = [torch.where(on, values[2 * j + 1], values[2 * j]) for j in range(len(values) // 2)]
        bit += 1
    return values[0].expand(indices.shape)


def gather_decode(indices: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """LUT values at ``indices`` by a gather from the flattened LUT.

    ``lut`` (G', 1, B, k), ``indices`` (G', R, B, C).
    """
    groups, _, per_row, k = lut.shape
    base = (
        torch.arange(groups, device=lut.device)[:, None, None] * per_row
        + torch.arange(per_row, device=lut.device)[None, None, :]
    ) * k
    return lut.reshape(-1)[indices.to(torch.int32) + base.to(torch.int32)[..., None]]


def lut_gemv(x: torch.Tensor, indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``x (M, cols) @ W.T`` -> (M, rows), ``W`` decoded from the grid views; ``table``: the fp32 LUT (G', 1, B, k).

    ``table`` holds the decoded values exactly (``lut.to(dtype).float()``); sums are fp32.
    """
    groups, rows_per_group, per_row, width = indices.shape
    k = table.shape[-1]
    w = select_decode(indices, table) if k <= 1 << SELECT_MAX_BITS else gather_decode(indices, table)
    xs = x.float().reshape(x.shape[0], 1, 1, per_row, width)
    y = (w.unsqueeze(0) * xs).sum(dim=(-1, -2))
    return y.reshape(x.shape[0], groups * rows_per_group).to(x.dtype)


class FusedGemv:
    """:func:`lut_gemv` under ``torch.compile`` (AVX-512 vectors where the CPU has them), compiled at first use.

    Returns None when compiling is off (``enabled=False``) or unavailable, and after the first failure (said once
    as a warning): the caller then uses the eager exact kernel. Which kernel a layer uses is its option
    (``LUTWeight.kernel``: ``"eager"`` never compiles), not a process-wide switch.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.failed: str | None = None if enabled else "compiling disabled"
        self.fn: Gemv | None = None

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
        if self.failed:
            return None
        if torch.compiler.is_compiling():  # inside a user's torch.compile: let Dynamo inline the plain ops
            return lut_gemv(x, indices, table)
        try:
            if self.fn is None:
                cpu = torch.backends.cpu.get_cpu_capability()
                self.fn = torch.compile(
                    lut_gemv, dynamic=False, options={"cpp.simdlen": 512} if cpu.startswith("AVX512") else {}
                )
                # one specialisation per (layer shape, layout, bits, tokens): a model has a few dozen at most
                dynamo = torch._dynamo.config
                dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
                dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 16 * RECOMPILE_LIMIT)
            return self.fn(x, indices, table)
        except Exception as err:  # no compiler, C++ build failure, unsupported Python...: eager exact kernel instead
            self.failed = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
            warnings.warn(
                f"edkm: compiled LUT kernel unavailable ({self.failed}); using the eager exact kernel", stacklevel=2
            )
            return None


@functools.cache
def fused_gemv() -> FusedGemv:
    """The process's compiled GEMV (one, like Dynamo's own code cache)."""
    return FusedGemv()

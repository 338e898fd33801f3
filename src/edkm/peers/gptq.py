"""GPTQ (Frantar et al., 2023): column-wise quantization with second-order error feedback.

For a linear layer with inputs X (calibration activations, training split) the layer-wise loss
||X W^T - X Q^T||^2 has Hessian H = 2 X^T X over the input columns. GPTQ quantizes one column at
a time and spreads its error over the columns not yet quantized with the optimal-brain-surgeon
update ``W[:, j:] -= (w_i - q_i) / Hinv_ii * Hinv_i,j:``, using the upper Cholesky factor of
H^-1 (dampened by ``damp x mean diag H``), lazily in blocks of ``block_size`` columns, optionally
in act-order (columns with the largest diag H first). Scales and zero points (per output channel,
per group of input columns, or per tensor) are fixed from the original weights before the sweep
("static groups"), so groups stay contiguous, which is what the packed format stores.

Example:
    >>> import torch
    >>> w, x = torch.randn(4, 8), torch.randn(64, 8)
    >>> idx, lo, step = gptq_uniform(w, 2 * x.T @ x, bits=3, group_size=4)
    >>> idx.shape, lo.shape
    (torch.Size([8, 4]), torch.Size([8, 1]))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edkm.config import PalettizeConfig
from edkm.layers.lut import LUTWeight, uniform_levels
from edkm.peers.calibrate import BlockInputs, quantize_layers_

QuantizeColumn = Callable[[torch.Tensor, int], torch.Tensor]


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize_column: QuantizeColumn,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> torch.Tensor:
    """The GPTQ sweep: ``quantize_column(w, j)`` rounds column ``j`` (original index) of the updated weight.

    Returns the quantized weight (fp32, ``weight``'s shape). Dead inputs (diag H = 0) are zeroed.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    cols = w.shape[1]
    if h.shape != (cols, cols):
        raise ValueError(f"hessian of shape {tuple(h.shape)} does not fit a weight with {cols} input columns")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = quantize_column(col, int(order[i1 + i]))
            q[:, i1 + i] = qc
            e = (col - qc) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # lazy batch update of the columns after the block
    return q[:, torch.argsort(order)]


def uniform_grid(weight: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max grid per group of ``group_size`` input columns of each row (None = per row, 0 = per tensor).

    Returns fp16 ``lo`` and ``step`` of shape (G, 1) in row-major group order (the packed format's).
    """
    rows, cols = weight.shape
    size = rows * cols if group_size == 0 else (group_size or cols)
    if group_size and cols % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the {cols} input columns of a {tuple(weight.shape)} weight"
        )
    groups = weight.detach().float().reshape(-1, size)
    lo, hi = groups.min(1, keepdim=True).values, groups.max(1, keepdim=True).values
    step = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-8)
    return lo.half(), step.half().clamp_min(torch.finfo(torch.float16).tiny)


def gptq_uniform(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None, **kw
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ onto a uniform grid: uint8 indices (G, n), fp16 ``lo`` and ``step`` (G, 1) for ``LUTWeight.from_uniform``.

    ``group_size``: input columns per scale (None = one per output channel, 0 = one per tensor).
    """
    rows, cols = weight.shape
    lo, step = uniform_grid(weight, bits, group_size)
    levels = uniform_levels(lo, step, bits).float()  # exactly what the LUT layer computes with
    per_row = lo.numel() // rows if group_size != 0 else 0  # groups per row (0: one for the tensor)
    size = cols // per_row if per_row else cols
    top = (1 << bits) - 1

    def group_of(j: int) -> torch.Tensor:
        return torch.arange(rows) * per_row + j // size if per_row else torch.zeros(rows, dtype=torch.long)

    def quantize_column(col: torch.Tensor, j: int) -> torch.Tensor:
        g = group_of(j)
        idx = torch.round((col - lo[g, 0].float()) / step[g, 0].float()).clamp(0, top).long()
        return levels[g, idx]

    q = gptq(weight, hessian, quantize_column, **kw)
    lut = levels.unsqueeze(1)  # (G, 1, k): nearest level of each quantized value is its index
    grouped = q.reshape(lo.numel(), -1, 1)
    idx = (grouped - lut).abs().argmin(-1)
    return idx.to(torch.uint8), lo, step


def fit_group(cols: int, group_size: int | None) -> int | None:
    """``group_size`` when it divides ``cols`` (and is smaller), else None (per output channel), 0 kept (per tensor)."""
    if group_size == 0:
        return 0
    return group_size if group_size and group_size < cols and cols % group_size == 0 else None


def rtn_lut(weight: torch.Tensor, bits: int, group_size: int | None = None) -> LUTWeight:
    """Round-to-nearest onto :func:`uniform_grid` (fp16 scale and zero point), as a LUTWeight."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    lo, step = uniform_grid(w, bits, fit_group(w.shape[1], group_size))
    groups = w.reshape(lo.numel(), -1)
    idx = torch.round((groups - lo.float()) / step.float()).clamp(0, (1 << bits) - 1)
    return LUTWeight.from_uniform(lo, step, idx.to(torch.uint8), weight.shape, bits, weight.dtype)


def gptq_(
    model: nn.Module, sequences: torch.Tensor, config: PalettizeConfig, group_size: int | None = None, **kw
) -> nn.Module:
    """GPTQ every target linear layer of ``model`` in place (block by block, calibrated on ``sequences``).

    Layers GPTQ cannot see a Hessian for (embeddings, a tied output layer) get round-to-nearest per
    channel at their configured bits. ``group_size`` falls back to per channel where it does not
    divide a layer's input width.
    """

    def make_lut(name: str, module: nn.Module, stats: dict[str, torch.Tensor]) -> LUTWeight:
        bits = config.for_module(name).bits
        if name not in stats:
            return rtn_lut(module.weight, bits)
        w = module.weight
        idx, lo, step = gptq_uniform(w, stats[name], bits, fit_group(w.shape[1], group_size), **kw)
        return LUTWeight.from_uniform(lo, step, idx, w.shape, bits, w.dtype)

    return quantize_layers_(model, config, make_lut, BlockInputs(sequences).hessians)

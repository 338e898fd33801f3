"""Approximate packed Linear (explicit opt-in): the decoded weight re-gridded to int8 per output row.

Each row ``w`` of the decoded weight becomes ``scale * q`` with ``q = round(w / scale)`` in [-127, 127]
and ``scale = max|w| / 127``, then ``aten._weight_int8pack_mm`` multiplies (oneDNN int8 weights,
fp32/bf16 activations). The error is the int8 rounding: at most ``scale / 2`` per weight, i.e.
``|w - scale q| <= max|w_row| / 254``; :attr:`Int8Weight.max_rel_error` reports the measured
``max |w - scale q| / max |w|`` per tensor. It costs one more byte per weight (the LUT indices stay
for saving); an LUT with more than 255 distinct levels per row loses resolution.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.5, -1.0], [0.25, 0.125]])
    >>> q = Int8Weight.from_rows(lambda rows: w[rows], 2)
    >>> q.max_rel_error < 1 / 254
    True
"""

from __future__ import annotations

from typing import Callable

import torch

ROWS_PER_TILE = 256


class Int8Weight:
    """int8 weight (rows, cols) with an fp32 scale per row, built tile by tile from a row decoder."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, max_rel_error: float) -> None:
        self.q, self.scales, self.max_rel_error = q, scales, max_rel_error

    @classmethod
    def from_rows(cls, decode: Callable[[slice], torch.Tensor], rows: int) -> Int8Weight:
        """Re-grid the weight whose rows ``decode(slice)`` returns (fp32), :data:`ROWS_PER_TILE` rows at a time."""
        qs, scales, err, top = [], [], 0.0, 0.0
        for start in range(0, rows, ROWS_PER_TILE):
            w = decode(slice(start, start + ROWS_PER_TILE)).float()
            scale = w.abs().amax(dim=1).clamp_min(1e-30) / 127
            q = torch.round(w / scale[:, None]).clamp(-127, 127)
            err = max(err, float((q * scale[:, None] - w).abs().max()))
            top = max(top, float(w.abs().max()))
            qs.append(q.to(torch.int8))
            scales.append(scale)
        return cls(torch.cat(qs), torch.cat(scales), err / top if top else 0.0)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ (scale * q).T + bias`` with int8 weights."""
        x2 = x.reshape(-1, x.shape[-1])
        act = x2 if x2.dtype in (torch.float32, torch.bfloat16, torch.float16) else x2.float()
        y = torch.ops.aten._weight_int8pack_mm(act.contiguous(), self.q, self.scales.to(act.dtype)).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.q.shape[0])

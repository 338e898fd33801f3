"""How a LUT weight's groups sit in its rows, and exact decoding of any rows of it.

A :class:`edkm.layers.lut.LUTWeight` keeps an fp16 LUT ``(G, k)`` and uint8 indices ``(G, n)``: group ``g``
holds the ``n`` consecutive weights ``g * n ... (g + 1) * n - 1`` of the row-major weight. Two layouts
arise from the library's clustering and both let a kernel broadcast the LUT instead of gathering it:

* ``rows``: a group is ``R = n / cols`` whole rows (one LUT per tensor, per channel, or per block of
  output channels, as DKM groups them);
* ``cols``: a row holds ``B = cols / n`` groups (round-to-nearest with an input-channel group size).

:func:`grid` gives the canonical 4-D views ``indices (G', R, B, C)`` and ``lut (G', 1, B, k)`` of
either layout; :func:`decode_rows` decodes any rows exactly, for any layout, holding only those rows.

Example:
    >>> import torch
    >>> lut = torch.tensor([[0.5, -1.0]], dtype=torch.float16)
    >>> idx = torch.tensor([[0, 1, 1, 0]], dtype=torch.uint8)
    >>> decode_rows(lut, idx, torch.Size([2, 2]), torch.float32, torch.tensor([1]))
    tensor([[-1.0000,  0.5000]])
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Grid(NamedTuple):
    """Canonical views of one LUT weight: ``indices (G', R, B, C)``, ``lut (G', 1, B, k)``."""

    indices: torch.Tensor
    lut: torch.Tensor
    layout: str  # "rows" or "cols"


def weight_rows_cols(shape: torch.Size) -> tuple[int, int]:
    """(rows, columns) of a weight of ``shape`` seen as a matrix (Linear: (out, in); Embedding: (num, dim))."""
    rows = shape[0] if len(shape) else 1
    return rows, (shape.numel() // rows if rows else 0)


def group_layout(shape: torch.Size, n: int) -> str | None:
    """``rows`` or ``cols`` (see the module docstring) for groups of ``n`` weights of a weight of ``shape``, or
    None where groups straddle rows unevenly.

    >>> group_layout(torch.Size([6, 4]), 8), group_layout(torch.Size([6, 4]), 2), group_layout(torch.Size([6, 4]), 6)
    ('rows', 'cols', None)
    """
    cols = weight_rows_cols(shape)[1]
    if cols and n % cols == 0:
        return "rows"
    if n and cols % n == 0:
        return "cols"
    return None


def grid(lut: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> Grid | None:
    """The 4-D views of ``lut`` / ``indices`` for a weight of ``shape``, or None if groups straddle rows unevenly."""
    groups, n = indices.shape
    k = lut.shape[1]
    rows, cols = weight_rows_cols(shape)
    layout = group_layout(shape, n)
    if layout == "rows":
        return Grid(indices.view(groups, n // cols, 1, cols), lut.view(groups, 1, 1, k), "rows")
    if layout == "cols":
        return Grid(indices.view(rows, 1, cols // n, n), lut.view(rows, 1, cols // n, k), "cols")
    return None


def decode_rows(
    lut: torch.Tensor, indices: torch.Tensor, shape: torch.Size, dtype: torch.dtype, rows: torch.Tensor | slice
) -> torch.Tensor:
    """Rows ``rows`` (a slice or a 1-D index tensor) of the decoded weight, shape (len(rows), cols), in ``dtype``.

    Bit-identical to ``edkm.decode(lut, indices, shape, dtype)[rows]``; never builds more than the rows asked for.
    """
    groups, n = indices.shape
    k = lut.shape[1]
    n_rows, cols = weight_rows_cols(shape)
    idx = indices.view(n_rows, cols)[rows]
    row_ids = torch.arange(n_rows, device=idx.device)[rows]
    table = lut.to(dtype).reshape(-1)
    index_dtype = torch.int32 if table.numel() < 2**31 else torch.int64
    layout = group_layout(shape, n)
    if layout == "rows":  # one group id per row
        flat = idx.to(index_dtype) + ((row_ids // (n // cols)) * k).to(index_dtype)[:, None]
    elif layout == "cols":  # cols // n groups per row
        per_row = cols // n
        base = (row_ids[:, None] * per_row + torch.arange(per_row, device=idx.device)) * k
        flat = (idx.view(-1, per_row, n).to(index_dtype) + base.to(index_dtype)[..., None]).view(-1, cols)
    else:  # groups straddle rows: group of element e is e // n
        element = row_ids[:, None] * cols + torch.arange(cols, device=idx.device)
        flat = idx.to(torch.int64) + (element // n) * k
    return torch.index_select(table, 0, flat.reshape(-1)).view(-1, cols)

"""16-bit weights: the straight-through cast and the <= 65,536 distinct values of a tensor.

A bf16/fp16 value is identified by its bit pattern, so the distinct values of any 16-bit tensor
are found in O(|W|) with one ``bincount`` (no sort), and a weight's bit pattern is its index.

Example:
    >>> import torch
    >>> from edkm.cluster.sixteen import unique16
    >>> values, counts, inverse = unique16(torch.tensor([0.5, -1.0, 0.5], dtype=torch.bfloat16))
    >>> values.tolist(), counts.tolist(), inverse.tolist()
    ([-1.0, 0.5], [1, 2], [1, 0, 1])
"""

from __future__ import annotations

import torch

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


class _CastStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        return w.to(dtype).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def cast_straight_through(w: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Round ``w`` to ``dtype`` values (kept in ``w.dtype``); the gradient passes unchanged."""
    if dtype not in SIXTEEN_BIT:
        raise ValueError(f"clustering dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    return _CastStraightThrough.apply(w, dtype)


def sixteen_bit_dtype(w: torch.Tensor) -> torch.dtype:
    """The 16-bit dtype whose values ``w`` holds exactly; raises ValueError if there is none."""
    if w.dtype in SIXTEEN_BIT:
        return w.dtype
    if w.is_floating_point():
        for dtype in SIXTEEN_BIT:
            if torch.equal(w.to(dtype).to(w.dtype), w):
                return dtype
    raise ValueError(
        f"expected weights holding exact 16-bit values (bf16/fp16, or {w.dtype} holding bf16 values such as "
        "w.to(torch.bfloat16).float()); got values that are not 16-bit. Round them first (the module wrapper "
        "does this with a straight-through cast)."
    )


def bit_patterns(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each value's 16-bit pattern as an int64 in [0, 65536)."""
    return w.detach().to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF


def unique16(w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct values (ascending, fp32), their counts and each weight's index into them.

    Runs in O(|W|) by counting bit patterns; +0.0 and -0.0 stay distinct patterns (equal values).
    """
    dtype = dtype or sixteen_bit_dtype(w)
    patterns = bit_patterns(w, dtype).reshape(-1)
    counts = torch.bincount(patterns, minlength=1 << 16)
    present = counts.nonzero().squeeze(1)
    values = present.to(torch.int16).view(dtype).float()  # patterns actually present: no NaN/Inf from absent ones
    order = torch.argsort(values, stable=True)
    values, present = values[order], present[order]
    lookup = torch.empty(1 << 16, dtype=torch.int64, device=w.device)
    lookup[present] = torch.arange(present.numel(), device=w.device)
    return values, counts[present], lookup[patterns]


def count16(w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values (ascending, fp32) and their counts, like :func:`unique16` without the per-weight
    index: counted in chunks of 1 M weights, so the transient memory is O(65,536), not O(|W|)."""
    dtype = dtype or sixteen_bit_dtype(w)
    flat = w.detach().reshape(-1)
    counts = torch.zeros(1 << 16, dtype=torch.int64, device=w.device)
    for a in range(0, flat.numel(), 1 << 20):
        counts += torch.bincount(bit_patterns(flat[a : a + (1 << 20)], dtype), minlength=1 << 16)
    present = counts.nonzero().squeeze(1)
    values = present.to(torch.int16).view(dtype).float()
    order = torch.argsort(values, stable=True)
    return values[order], counts[present[order]]

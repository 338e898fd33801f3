"""SqueezeLLM-style dense non-uniform quantization (Kim et al., 2024): Fisher-weighted k-means.

Each LUT (one per output row in SqueezeLLM; ``per_row=False`` gives one per tensor, our format's
cheapest) is the weighted 1-D k-means of its weights with the Fisher diagonal (squared gradients
of the loss on calibration data from the training split) as weights: the LUT minimises
sum_i F_i (w_i - c(w_i))^2, a diagonal approximation of the loss increase.

Example:
    >>> import torch
    >>> w = torch.randn(4, 64)
    >>> lut, idx = weighted_kmeans(w, torch.rand(4, 64), 8)
    >>> lut.shape, idx.shape
    (torch.Size([4, 8]), torch.Size([4, 64]))
"""

from __future__ import annotations

import torch
from torch import nn

from edkm.cluster import hard_assign
from edkm.config import PalettizeConfig
from edkm.layers.lut import LUT_DTYPE, LUTWeight
from edkm.peers.calibrate import fisher_diagonal, quantize_layers_


def _assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each value (rows of ``x`` with their own sorted centroids ``c``)."""
    mid = ((c[:, :-1] + c[:, 1:]) / 2).contiguous()
    return torch.searchsorted(mid, x.contiguous())


def _lloyd(x: torch.Tensor, f: torch.Tensor, c: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Lloyd iterations per row; returns (sorted centroids, weighted SSE per row)."""
    for _ in range(iters):
        idx = _assign(x, c)
        mass = torch.zeros_like(c).scatter_add_(1, idx, f)
        moment = torch.zeros_like(c).scatter_add_(1, idx, f * x)
        new = torch.sort(torch.where(mass > 0, moment / mass.clamp_min(1e-300), c), dim=1).values
        if torch.equal(new, c):
            break
        c = new
    err = (f * (x - torch.gather(c, 1, _assign(x, c))).square()).sum(1)
    return c, err


def weighted_kmeans(
    weight: torch.Tensor, fisher: torch.Tensor, k: int, *, groups: int | None = None, iters: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fisher-weighted k-means per group of rows (``groups``: None = one LUT per row, 1 = per tensor).

    Returns the fp16 LUT (G, k), sorted, and uint8 indices (G, n) of the nearest LUT entry. The better
    (by weighted error) of two starts is kept: weighted quantiles and evenly spaced over the range.
    """
    g = weight.shape[0] if groups is None else groups
    x = weight.detach().double().reshape(g, -1)
    f = fisher.detach().double().reshape(g, -1).clamp_min(0) + 1e-30  # all-zero rows fall back to plain k-means
    order = torch.sort(x, dim=1)
    cum = torch.cumsum(torch.gather(f, 1, order.indices), 1)
    targets = (torch.arange(k, dtype=torch.float64) + 0.5) / k * cum[:, -1:]
    starts = [
        torch.gather(order.values, 1, torch.searchsorted(cum, targets).clamp_max(x.shape[1] - 1)),
        x.min(1, keepdim=True).values
        + (x.max(1, keepdim=True).values - x.min(1, keepdim=True).values)
        * torch.linspace(0, 1, k, dtype=torch.float64),
    ]
    results = [_lloyd(x, f, torch.sort(c, dim=1).values, iters) for c in starts]
    best = torch.where((results[0][1] <= results[1][1]).unsqueeze(1), results[0][0], results[1][0])
    lut = best.to(LUT_DTYPE)  # the stored LUT; indices are assigned to its fp16 values
    idx = _assign(x.float(), lut.float())
    return lut, idx.to(torch.uint8 if k <= 256 else torch.int32)


def weighted_error(weight: torch.Tensor, fisher: torch.Tensor, lut: torch.Tensor, idx: torch.Tensor) -> float:
    """sum_i F_i (w_i - lut[idx_i])^2 (the objective :func:`weighted_kmeans` minimises)."""
    g = lut.shape[0]
    q = torch.gather(lut.double(), 1, idx.long().reshape(g, -1))
    return float((fisher.double().reshape(g, -1) * (weight.double().reshape(g, -1) - q).square()).sum())


def squeeze_(
    model: nn.Module, sequences: torch.Tensor, config: PalettizeConfig, per_row: bool = True, iters: int = 100
) -> nn.Module:
    """Fisher-weighted k-means of every target layer in place (Fisher from the fp model on ``sequences``).

    Layers at more than 4 bits (the 8-bit tied embedding / output layer) get plain k-means, one LUT per
    tensor: its Fisher is zero on the rows of tokens the calibration text never shows, and weighting
    by it would leave those output rows to chance (SqueezeLLM leaves these layers unquantized).
    """
    fisher = fisher_diagonal(model, sequences)

    def make_lut(name: str, module: nn.Module, _stats: dict[str, torch.Tensor]) -> LUTWeight:
        w, bits = module.weight, config.for_module(name).bits
        if bits > 4:  # the same k-means on the distinct values, weighted by their counts: seconds, not minutes
            values, counts = torch.unique(w.detach().float(), return_counts=True)  # sorted, flattened
            lut, _ = weighted_kmeans(values[None], counts[None].double(), 1 << bits, groups=1, iters=iters)
            idx, _ = hard_assign(w, lut.float())
        else:
            lut, idx = weighted_kmeans(w, fisher[id(w)], 1 << bits, groups=None if per_row else 1, iters=iters)
        return LUTWeight(lut, idx, w.shape, bits, w.dtype)

    return quantize_layers_(model, config, make_lut)

"""Weight uniquification (U): a per-weight saved map stored as its distinct rows plus an index.

A 16-bit tensor holds at most 65,536 distinct values and every row of a DKM map (the |W| x |C|
distances and attentions, and the (N, 1) weight column) is a function of one weight's value, so
a saved map of shape (G, n, ...) is stored as one row per distinct value (per group: with one LUT
per group the rows depend on (group, w_i), so the key is the pair) plus one index per weight in
the narrowest integer type. The index is computed once per DKM call (``unique16``: O(|W|), no
sort for one group) and shared by every map that call saves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edkm.cluster.sixteen import sixteen_bit_dtype, unique16
from edkm.memory.shard import Shard, shard, unshard


def narrow_index(inverse: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
    """``inverse`` (values in [0, rows)) in the narrowest dtype, and the offset to add back."""
    if rows <= 1 << 8:
        return inverse.to(torch.uint8), 0
    if rows <= 1 << 16:
        return (inverse - 32768).to(torch.int16), 32768  # 65,536 values fit int16 with an offset
    if rows <= 1 << 31:
        return inverse.to(torch.int32), 0
    return inverse.to(torch.int64), 0


def widen(index: torch.Tensor, offset: int) -> torch.Tensor:
    """Inverse of :func:`narrow_index`: int64 indices."""
    return index.long() + offset if offset else index.long()


@dataclass(frozen=True)
class UniqueIndex:
    """Which distinct row each of the G*n weights (row-major) maps to."""

    groups: int
    per_group: int
    rows: int  # distinct rows
    rep: torch.Tensor  # (rows,) int64: a weight holding each distinct row
    index: torch.Tensor  # (G*n,) narrow dtype
    offset: int

    def distinct_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(rows, rest) distinct rows of a per-weight tensor ``t``."""
        return t.detach().reshape(self.groups * self.per_group, -1).index_select(0, self.rep.to(t.device))


def build_index(weights: torch.Tensor, groups: int, dtype: torch.dtype | None = None) -> UniqueIndex:
    """Index the distinct (group, 16-bit value) pairs of ``weights`` split into ``groups`` row-major groups.

    ``dtype``: the weights' 16-bit type when the caller has checked it already (else checked here).
    """
    with torch.no_grad():
        try:
            dtype = dtype or sixteen_bit_dtype(weights)
        except ValueError as err:
            raise ValueError(f"memory mode 'unique' needs exact 16-bit weights: {err}") from None
        values, _, inverse = unique16(weights, dtype)
        rows = values.numel()
        total = inverse.numel()
        if groups > 1:  # rows depend on (group, value): key the pair
            group = torch.arange(groups, device=inverse.device).repeat_interleave(total // groups)
            keys, inverse = torch.unique(group * rows + inverse, return_inverse=True)
            rows = keys.numel()
        rep = torch.empty(rows, dtype=torch.int64, device=inverse.device)
        rep.scatter_(0, inverse, torch.arange(total, device=inverse.device))  # any holder: equal rows
        index, offset = narrow_index(inverse, rows)
    return UniqueIndex(groups, total // groups, rows, rep, index, offset)


class IndexStore:
    """The index of one DKM call as held for backward: whole, or this rank's shard of it."""

    def __init__(self, ui: UniqueIndex, sharded: bool, place: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        self.offset = ui.offset
        self.shard: Shard | None = None
        self.index: torch.Tensor | None = None
        if sharded:
            s = shard(ui.index)
            self.shard = Shard(place(s.piece, "index"), s.length)
        else:
            self.index = place(ui.index, "index")

    def full(self, device: torch.device) -> torch.Tensor:
        """int64 index of every weight on ``device`` (an all-gather when sharded)."""
        if self.shard is not None:
            return widen(unshard(self.shard, device), self.offset)
        assert self.index is not None
        return widen(self.index.to(device, non_blocking=True), self.offset)


@dataclass
class Rows:
    """A per-weight saved map as distinct rows plus the shared index; ``flat()`` rebuilds it."""

    rows: torch.Tensor
    index: IndexStore
    device: torch.device

    def flat(self) -> torch.Tensor:
        rows = self.rows.to(self.device, non_blocking=True)
        return rows.index_select(0, self.index.full(self.device)).reshape(-1)

"""Which eDKM memory techniques a DKM call uses: ``parse_memory("marshal+unique+shard")``.

"plain" (none), any "+"-joined combination of "marshal" (M), "unique" (U) and "shard" (S) in any
order, "fused" (DKM computed in the unique domain, SPEC §4; cannot be combined) or "auto": fused
when the weights hold exact 16-bit values, else marshal, plus shard when a process group with
more than one rank is initialised ("auto" is resolved per call by :meth:`MemoryPlan.resolve`).

"shard" without "unique" shards each per-weight saved map itself (no 16-bit requirement); with
"unique" it shards U's index list, as in the paper (see :mod:`edkm.memory.shard`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cluster.sixteen import sixteen_bit_dtype
from .shard import world_size

PAPER = ("marshal", "unique", "shard")
ALONE = ("plain", "fused", "auto")


@dataclass(frozen=True)
class MemoryPlan:
    """Flags of one memory spec; ``str(plan)`` gives the canonical spec back."""

    marshal: bool = False
    unique: bool = False
    shard: bool = False
    fused: bool = False
    auto: bool = False

    def __post_init__(self) -> None:
        paper = self.marshal or self.unique or self.shard
        if self.fused + self.auto + paper > 1:
            raise ValueError(f"'fused' and 'auto' cannot be combined with anything: {self.__dict__}")

    @property
    def plain(self) -> bool:
        """No technique: autograd saves what it saves."""
        return not (self.marshal or self.unique or self.shard or self.fused or self.auto)

    def resolve(self, weights: torch.Tensor) -> MemoryPlan:
        """The concrete plan for ``weights`` ("auto" decided now, other plans unchanged)."""
        if not self.auto:
            return self
        with torch.no_grad():
            try:
                sixteen_bit_dtype(weights)
                return MemoryPlan(fused=True)
            except ValueError:
                return MemoryPlan(marshal=True, shard=world_size() > 1)

    def __str__(self) -> str:
        names = [n for n in (*PAPER, "fused", "auto") if getattr(self, n)]
        return "+".join(names) or "plain"


def parse_memory(spec: str) -> MemoryPlan:
    """Parse a memory spec (see module docstring); ValueError naming the valid names otherwise."""
    parts = [p.strip() for p in str(spec).split("+")]
    valid = f"valid: {', '.join(PAPER)} (joined with '+' in any order), or one of {', '.join(ALONE)}"
    for p in parts:
        if p not in PAPER + ALONE:
            raise ValueError(f"unknown memory mode {p!r} in {spec!r}; {valid}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"memory spec {spec!r} names a mode twice; {valid}")
    if len(parts) > 1 and any(p in ALONE for p in parts):
        raise ValueError(f"memory spec {spec!r}: {', '.join(ALONE)} cannot be combined; {valid}")
    if parts == ["plain"]:
        return MemoryPlan()
    return MemoryPlan(**{p: True for p in parts})

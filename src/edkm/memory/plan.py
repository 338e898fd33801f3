"""Which eDKM memory techniques a DKM call uses: ``parse_memory("marshal+unique+shard")``.

"plain" (none), any "+"-joined combination of "marshal" (M), "unique" (U) and "shard" (S) in any
order, "fused" (DKM computed in the unique domain, docs/method.md §4; cannot be combined) or "auto": fused
when the weights hold exact 16-bit values, else marshal, plus shard when a process group with
more than one rank is initialised ("auto" is resolved per call by :meth:`MemoryPlan.resolve`).

"shard" without "unique" shards each per-weight saved map itself (no 16-bit requirement); with
"unique" it shards U's index list, as in the paper (see :mod:`edkm.memory.shard`).

Under torch.distributed the 16-bit test is decided collectively (:func:`agreed_sixteen_bit`)
before any rank does rank-specific work, so ranks that disagree (one rank's weights not 16-bit,
hence "auto" resolving differently) all raise the same error instead of one raising while the
others wait in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from edkm.cluster.sixteen import SIXTEEN_BIT, sixteen_bit_dtype
from edkm.ranks import rank_world

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
        return self.decide(weights)[0]

    def decide(self, weights: torch.Tensor) -> tuple[MemoryPlan, torch.dtype | None]:
        """(concrete plan, 16-bit dtype of the weights when the plan needs one), decided on every rank alike.

        One 16-bit test per call, only for "auto", "fused" and "unique"; ValueError on every rank when
        such a plan meets weights that are not 16-bit, RuntimeError on every rank when ranks disagree.
        """
        if not (self.auto or self.fused or self.unique):
            return self, None
        dtype = agreed_sixteen_bit(weights)
        if self.auto:
            return (
                (MemoryPlan(fused=True), dtype)
                if dtype
                else (MemoryPlan(marshal=True, shard=rank_world()[1] > 1), None)
            )
        if dtype is None:
            raise ValueError(
                f"memory mode {'unique' if self.unique else 'fused'!r} needs exact 16-bit weights "
                f"(bf16/fp16, or {weights.dtype} "
                "holding bf16 values such as w.to(torch.bfloat16).float()); round them first (palettize_ does)"
            )
        return self, dtype

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


def agreed_sixteen_bit(weights: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype whose values ``weights`` hold exactly (None if none), the same on every rank.

    Under an initialised process group with more than one rank, one ``all_reduce`` on the weights'
    device compares the answers; RuntimeError on every rank when they differ.
    """
    with torch.no_grad():
        try:
            dtype: torch.dtype | None = sixteen_bit_dtype(weights)
        except ValueError:
            dtype = None
    if rank_world()[1] > 1:
        code = 0 if dtype is None else 1 + SIXTEEN_BIT.index(dtype)
        both = torch.tensor([code, -code], dtype=torch.int64, device=weights.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)  # max and -min in one collective
        if int(both[0]) != -int(both[1]):
            raise RuntimeError(
                "ranks disagree about the weights: they hold exact 16-bit values on some ranks but not on others "
                f"(this rank: {dtype or 'not 16-bit'}), so memory 'auto' / 'fused' / 'unique' would differ between "
                "ranks; data-parallel ranks need identical weights"
            )
    return dtype

"""The eDKM saved-tensor hooks: dedup check, then uniquify, then shard, then copy to host (docs/method.md §3).

One :class:`SavedTensorHooks` serves one DKM forward (``with hooks: dkm_autograd(...)``); its state
(the registry of stored tensors, the shared index) lives on the object, never in globals. Unpack
reverses pack. The storage-identity check runs in every mode, since U and S create new tensors
and must not create them twice for one storage; M adds the move to the host.

What each saved tensor becomes (leaves that require grad are always kept as they are):

==========================  ======================================================
per-weight (G, n, ...) map  U: distinct rows + shared index (index sharded under S)
                            S without U: this rank's 1/N of the map
anything else               M: host copy of its storage span; otherwise kept
==========================  ======================================================

Under S every unpack of a sharded part is one all-gather; :mod:`edkm.memory.shard` says why
ranks issue them in the same order.
"""

from __future__ import annotations

import torch

from edkm.memory.marshal import MAX_HOPS, Flat, Kept, Registry, View, span, to_host
from edkm.memory.plan import MemoryPlan
from edkm.memory.shard import Shard, ShardedFlat, check_replicated, require_group, shard
from edkm.memory.stats import SavedStats, current_stats, leaf_backed
from edkm.memory.unique import IndexStore, Rows, UniqueIndex, build_index

_SPARSE_SPAN = 2  # copy compactly when a tensor's storage span is over 2x its elements


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


class SavedTensorHooks:
    """Pack/unpack hooks for one DKM call on ``weights`` with ``centroids`` of shape (k,) or (G, k).

    Args:
        plan: a resolved :class:`MemoryPlan` (not fused, not auto).
        weights, centroids: the DKM inputs (U indexes the weights; S checks both are replicated).
        max_hops: graph steps searched for copies of stored tensors (M).
        copy_on_cpu: really copy CPU tensors to new host memory, as a device run would (tests).
        dtype: the weights' 16-bit type when already known (U then skips its own check).
    """

    def __init__(
        self,
        plan: MemoryPlan,
        weights: torch.Tensor,
        centroids: torch.Tensor,
        *,
        max_hops: int = MAX_HOPS,
        copy_on_cpu: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        if plan.fused or plan.auto:
            raise ValueError(f"SavedTensorHooks needs a resolved paper-mode plan, got {plan}")
        self.plan, self.copy_on_cpu = plan, copy_on_cpu
        self.stats: SavedStats = current_stats() or SavedStats()
        self.registry = Registry(max_hops)
        groups = centroids.shape[0] if centroids.dim() == 2 else 1
        if weights.numel() % groups:
            raise ValueError(f"{weights.numel()} weights cannot be split into {groups} equal groups")
        self.groups, self.per_group = groups, weights.numel() // groups
        self.unique: UniqueIndex | None = build_index(weights, groups, dtype) if plan.unique else None
        self._index: IndexStore | None = None
        if plan.shard:
            require_group()
            check_replicated(weights, centroids)
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, unpack)

    def __enter__(self) -> SavedTensorHooks:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
        # autograd keeps the hooks (hence this object) with every saved tensor until backward:
        # drop the forward-only lookup tables and the device index (the stored one is in IndexStore)
        self.registry = Registry(self.registry.max_hops)
        self.unique = None
        self._index = None  # the packed maps that need it hold it: freed with them after backward

    def _per_weight(self, t: torch.Tensor) -> bool:
        return t.dim() >= 2 and t.shape[0] == self.groups and t.shape[1] == self.per_group

    def _place(self, t: torch.Tensor, kind: str, nbytes: int | None = None) -> torch.Tensor:
        """Hold ``t`` for backward: on the host under M (counting the copy), else where it is."""
        size = t.numel() * t.element_size() if nbytes is None else nbytes
        if not self.plan.marshal:
            self.stats.hold(t, "device", kind, size)
            return t
        host = to_host(t, self.copy_on_cpu)
        self.stats.copied_bytes += size
        # a CPU "copy" that is the original (or a view of it) is counted as its own new storage
        self.stats.hold(host, "host", kind, size, key=object() if host is t or host._base is not None else None)
        return host

    def _index_store(self) -> IndexStore:
        if self._index is None:
            assert self.unique is not None
            self._index = IndexStore(self.unique, self.plan.shard, self._place)
        return self._index

    def pack(self, t: torch.Tensor) -> object:
        """Dedup check, uniquify, shard, copy to host, in that order."""
        self.stats.saved += 1
        if leaf_backed(t) or t.numel() == 0:
            return Kept(t)  # held by the graph anyway / nothing to hold
        if type(t) is not torch.Tensor or t.layout != torch.strided:
            self.stats.hold(t, "device", "saved")
            return Kept(t)
        hit = self.registry.find(t)
        if hit is not None:
            self.stats.referenced += 1
            return hit
        per_weight = self._per_weight(t)
        if per_weight and self.unique is not None:
            rows = self._place(self.unique.distinct_rows(t), "rows")
            source: Rows | ShardedFlat | Flat = Rows(rows, self._index_store(), t.device)
        elif per_weight and self.plan.shard:
            s = shard(t.detach().reshape(-1))
            source = ShardedFlat(Shard(self._place(s.piece, "shard"), s.length), t.device)
        elif self.plan.marshal:
            lo, hi = span(t)
            if hi - lo <= _SPARSE_SPAN * t.numel():  # copy the span; views of it resolve to it later
                flat = t.detach().as_strided((hi - lo,), (1,), lo)
                data = self._place(flat, "copy")
                saved = View(Flat(data, t.device), tuple(t.shape), t.stride(), t.storage_offset() - lo)
                self.registry.add(t, saved, (lo, hi))
                return saved
            source = Flat(self._place(t.detach().contiguous().reshape(-1), "copy"), t.device)
        else:
            self.stats.hold(t, "device", "saved")
            return Kept(t)
        if t.is_contiguous():  # a logical copy of a contiguous tensor is also its storage span
            lo = t.storage_offset()
            saved = View(source, tuple(t.shape), t.stride(), 0)
            self.registry.add(t, saved, (lo, lo + t.numel()))
        else:
            saved = View(source, tuple(t.shape), _contiguous_strides(t.shape), 0)
            self.registry.add(t, saved, None)
        return saved


def unpack(packed: object) -> torch.Tensor:
    """Rebuild a saved tensor on its original device (an all-gather per sharded part)."""
    assert isinstance(packed, (View, Kept)), type(packed)
    return packed.unpack()

"""Counting what autograd holds for backward (docs/method.md §5), one storage counted once.

``track_saved()`` fills a :class:`SavedStats`. Inside it, plain autograd (no eDKM hooks) is counted
by a pass-through pack hook; the eDKM hooks of :mod:`edkm.memory` are innermost while DKM runs
(PyTorch uses only the innermost saved-tensor hooks) and report what *they* keep instead.

Categories: ``device_bytes`` held on the compute device, ``host_bytes`` held on the host (CPU),
``copied_bytes`` moved device -> host. On a CPU-only run the "device" is the CPU too; the hooks
then copy nothing but count what a device run would hold and copy. Storages of leaf tensors that
require grad (parameters) are held by the graph anyway and are not counted.

Example:
    >>> import torch, edkm
    >>> from edkm.memory import track_saved
    >>> w = torch.randn(64, 48).bfloat16().requires_grad_()
    >>> with track_saved() as stats:
    ...     _ = edkm.dkm(w, torch.linspace(-2, 2, 8), tau=0.01, iters=3)
    >>> stats.device_bytes >= 2 * 4 * (64 * 48 * 8 * 4)  # diff and A maps of 4 soft assignments
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef

_CURRENT: ContextVar[SavedStats | None] = ContextVar("edkm_saved_stats", default=None)


def storage_ref(t: torch.Tensor) -> StorageWeakRef:
    """A weak reference to ``t``'s storage: while it lives, no other storage can take its identity."""
    return StorageWeakRef(t.untyped_storage())


def leaf_backed(t: torch.Tensor) -> bool:
    """True when ``t`` is (a view of) a leaf that requires grad: the graph keeps it alive anyway."""
    root = t._base if t._base is not None else t
    return root.is_leaf and root.requires_grad


@dataclass
class SavedStats:
    """Bytes a forward left held for backward; each storage counted once (see module docstring)."""

    device_bytes: int = 0
    host_bytes: int = 0
    copied_bytes: int = 0
    saved: int = 0  # tensors autograd handed to a pack hook
    stored: int = 0  # distinct storages held (copies, rows, indices, shards, kept originals)
    referenced: int = 0  # saves answered by a reference to something already stored
    kinds: dict[str, int] = field(default_factory=dict)  # bytes by kind: saved, copy, rows, index, shard
    _seen: dict[Hashable, StorageWeakRef | None] = field(default_factory=dict, repr=False)

    @property
    def footprint(self) -> int:
        """Device plus host bytes held for backward."""
        return self.device_bytes + self.host_bytes

    def hold(self, t: torch.Tensor, where: str, kind: str, nbytes: int | None = None, key: Hashable = None) -> None:
        """Count ``t``'s storage (or ``nbytes`` under ``key``) once, on "device" or "host"."""
        ref = None
        if key is None:
            ref = storage_ref(t)
            key = ref.cdata  # the weak ref pins this identity for as long as the stats live
        if key in self._seen:
            return
        self._seen[key] = ref
        size = t.untyped_storage().nbytes() if nbytes is None else nbytes
        self.stored += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + size
        if where == "device":
            self.device_bytes += size
        else:
            self.host_bytes += size

    def as_dict(self) -> dict[str, object]:
        """JSON-ready numbers."""
        keys = ("device_bytes", "host_bytes", "copied_bytes", "saved", "stored", "referenced")
        return {**{k: getattr(self, k) for k in keys}, "footprint": self.footprint, "kinds": dict(self.kinds)}


def current_stats() -> SavedStats | None:
    """The stats of the innermost active :func:`track_saved`, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def track_saved(save_on_cpu: bool = False) -> Iterator[SavedStats]:
    """Count saved tensors; with ``save_on_cpu`` also behave like ``torch.autograd.graph.save_on_cpu``.

    The ``save_on_cpu`` baseline copies every saved tensor (parameters included), each copy counted
    separately as torch does it: the reference that marshaling (M) improves on.
    """
    stats = SavedStats()

    def pack(t: torch.Tensor) -> object:
        stats.saved += 1
        if save_on_cpu:
            nbytes = t.numel() * t.element_size()
            stats.copied_bytes += nbytes
            if t.device.type == "cpu":  # nothing to move; count what a device run would copy
                stats.hold(t, "host", "copy", nbytes, key=object())
                return t.device, t
            host = torch.empty(t.size(), dtype=t.dtype, pin_memory=t.device.type == "cuda")
            host.copy_(t, non_blocking=True)
            stats.hold(host, "host", "copy")
            return t.device, host
        if not leaf_backed(t):
            stats.hold(t, "device", "saved")
        return t

    def unpack(packed: object) -> torch.Tensor:
        if isinstance(packed, tuple):
            device, t = packed
            return t.to(device, non_blocking=True)
        return packed  # type: ignore[return-value]

    token = _CURRENT.set(stats)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield stats
    finally:
        _CURRENT.reset(token)

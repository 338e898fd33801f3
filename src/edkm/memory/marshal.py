"""Cross-device tensor marshaling (M): move saved tensors to the host, each storage only once.

``torch.autograd.graph.save_on_cpu`` copies every saved tensor, even views of one storage. Here
each saved tensor is first looked up in a :class:`Registry` of what this DKM call already stored:

* same storage (a view, transpose, view-reshape, or the very same tensor saved twice): store a
  reference plus the geometry; unpack re-applies ``as_strided`` (size, stride, storage offset) to
  the already-stored span, which is exact. A storage is identified by its ``StorageImpl`` held
  through a weak reference (``StorageWeakRef``): while the registry lives, no other storage can
  take that identity, so a freed and reused address is never confused; the data pointer and the
  version counter (in-place writes) must also match. A view and its ``._base`` share one storage,
  so views need no graph walk, however many view steps apart;
* a copy (e.g. ``reshape`` of a transposed tensor, ``contiguous()``): walk ``grad_fn.next_functions``
  up to ``max_hops`` (4, as the paper) to stored tensors that are still alive, and accept one when
  the copy equals it permuted and reshaped, bit for bit; unpack re-applies that permute+reshape.

Otherwise the span of storage the tensor touches is copied to the host (pinned, non-blocking on
CUDA). On a CPU-only run nothing is copied (the host *is* the device); the counts say what a device
run would copy. Unpack returns a tensor on the original device with identical values.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from edkm.memory.stats import storage_ref

MAX_HOPS = 4  # the paper found 4 hops enough for every relation in DKM
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class Source(Protocol):
    """Something stored that rebuilds a flat 1-D tensor on the compute device."""

    def flat(self) -> torch.Tensor: ...


@dataclass
class Flat:
    """A flat copy (host or device) of elements of a storage."""

    data: torch.Tensor
    device: torch.device

    def flat(self) -> torch.Tensor:
        return self.data.to(self.device, non_blocking=True)


@dataclass
class View:
    """A saved tensor as a strided view of a stored flat source."""

    source: Source
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def unpack(self) -> torch.Tensor:
        return self.source.flat().as_strided(self.size, self.stride, self.offset)


@dataclass
class Derived:
    """A copy of a stored tensor, permuted then reshaped (contiguous)."""

    base: View
    perm: tuple[int, ...]

    def flat(self) -> torch.Tensor:
        return self.base.unpack().permute(self.perm).reshape(-1)


@dataclass
class Kept:
    """A saved tensor kept as it is."""

    tensor: torch.Tensor

    def unpack(self) -> torch.Tensor:
        return self.tensor


def span(t: torch.Tensor) -> tuple[int, int]:
    """[lo, hi): the storage elements (in ``t.dtype``) that ``t`` touches."""
    lo = t.storage_offset()
    return lo, lo + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def to_host(t: torch.Tensor, copy_on_cpu: bool = False) -> torch.Tensor:
    """``t`` on the CPU: a pinned non-blocking copy from CUDA, ``t`` itself if already on the CPU."""
    if t.device.type == "cpu":
        return t.clone() if copy_on_cpu else t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
    return host.copy_(t, non_blocking=t.device.type == "cuda")


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (tells -0.0 from 0.0, NaN equals the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_complex():
        return bits_equal(torch.view_as_real(a), torch.view_as_real(b))
    if a.is_floating_point():
        return torch.equal(a.view(_INT[a.element_size()]), b.view(_INT[b.element_size()]))
    return torch.equal(a, b)


def ancestors(node: object, hops: int) -> Iterator[object]:
    """``node`` and the autograd nodes up to ``hops`` steps behind it (breadth first)."""
    seen, frontier = {node}, [node]
    yield node
    for _ in range(hops):
        nxt = []
        for n in frontier:
            for m, _ in n.next_functions:  # type: ignore[attr-defined]
                if m is not None and m not in seen:
                    seen.add(m)
                    nxt.append(m)
                    yield m
        frontier = nxt


@dataclass
class Entry:
    """One stored tensor: its storage identity, its geometry, and how to rebuild it."""

    ref: StorageWeakRef
    data_ptr: int
    version: int
    dtype: torch.dtype
    geometry: tuple[tuple[int, ...], tuple[int, ...], int]
    saved: View
    region: tuple[int, int] | None  # storage elements [lo, hi) that ``saved.source.flat()`` holds
    tensor: weakref.ref[torch.Tensor]


class Registry:
    """What one DKM forward has stored, for the dedup check (lives for that forward only)."""

    def __init__(self, max_hops: int = MAX_HOPS) -> None:
        self.max_hops = max_hops
        self.by_storage: dict[int, list[Entry]] = {}
        self.by_node: dict[object, list[Entry]] = {}

    def add(self, t: torch.Tensor, saved: View, region: tuple[int, int] | None) -> None:
        """Record that ``t`` is stored as ``saved``."""
        ref = storage_ref(t)  # pins the StorageImpl identity while the registry lives
        geometry = (tuple(t.shape), t.stride(), t.storage_offset())
        entry = Entry(ref, t.untyped_storage().data_ptr(), t._version, t.dtype, geometry, saved, region, weakref.ref(t))
        self.by_storage.setdefault(ref.cdata, []).append(entry)
        if t.grad_fn is not None:
            self.by_node.setdefault(t.grad_fn, []).append(entry)

    def find(self, t: torch.Tensor) -> View | None:
        """A reference rebuilding ``t`` from something stored, or None."""
        storage = t.untyped_storage()
        for e in self.by_storage.get(storage._cdata, ()):
            if e.ref.expired() or e.data_ptr != storage.data_ptr() or e.version != t._version or e.dtype != t.dtype:
                continue
            if e.geometry == (tuple(t.shape), t.stride(), t.storage_offset()):
                return e.saved
            lo, hi = span(t)
            if e.region is not None and e.region[0] <= lo and hi <= e.region[1]:
                return View(e.saved.source, tuple(t.shape), t.stride(), t.storage_offset() - e.region[0])
        return self._copy_of(t)

    def _copy_of(self, t: torch.Tensor) -> View | None:
        """``t`` as a permute+reshape of a stored tensor found within ``max_hops`` graph steps."""
        if t.grad_fn is None or not t.is_contiguous():
            return None
        for node in ancestors(t.grad_fn, self.max_hops):
            for e in self.by_node.get(node, ()):
                u = e.tensor()
                if u is None or u.dtype != t.dtype or u.numel() != t.numel() or u._version != e.version:
                    continue
                for perm in itertools.permutations(range(u.dim())) if u.dim() <= 4 else [tuple(range(u.dim()))]:
                    if bits_equal(u.permute(perm).reshape(t.shape), t):
                        saved = View(Derived(e.saved, perm), tuple(t.shape), t.stride(), 0)
                        self.add(t, saved, (t.storage_offset(), t.storage_offset() + t.numel()))
                        return saved
        return None

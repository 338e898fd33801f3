"""Marshaling (M): views, transposes, reshapes and repeats stored once; reused addresses never confused."""

from __future__ import annotations

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from edkm.memory import MemoryPlan, track_saved
from edkm.memory.hooks import SavedTensorHooks
from edkm.memory.marshal import bits_equal

M = MemoryPlan(marshal=True)


class Save(torch.autograd.Function):
    """Identity on ``x`` that saves ``others`` for backward and hands what it unpacks to ``sink``."""

    @staticmethod
    def forward(ctx, x, sink, *others):  # type: ignore[override]
        ctx.sink = sink
        ctx.save_for_backward(*others)
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        ctx.sink.extend(ctx.saved_tensors)
        return (g, None, *[None] * len(ctx.saved_tensors))


def hooks(**kw) -> SavedTensorHooks:
    """Marshal hooks for a (1-group) DKM-free graph; real host copies as a device run makes."""
    return SavedTensorHooks(M, torch.zeros(2), torch.zeros(1), copy_on_cpu=True, **kw)


def save_and_unpack(make, **kw):
    """Build tensors with ``make()`` under the hooks, save them, return (originals, unpacked, stats)."""
    x = torch.zeros(1, requires_grad=True)
    sink: list[torch.Tensor] = []
    with track_saved() as stats, hooks(**kw):
        tensors = make()
        y = Save.apply(x, sink, *tensors)
    y.sum().backward()
    return tensors, sink, stats


def assert_same(originals, unpacked):
    for t, u in zip(originals, unpacked, strict=True):
        assert u.device == t.device and u.shape == t.shape and u.stride() == t.stride()
        assert bits_equal(u, t.detach())


def test_views_transposes_reshapes_and_repeats_are_stored_once():
    base = torch.randn(6, 4, requires_grad=True)

    def make():
        b = base * 2  # a non-leaf, so it is stored
        return [b, b.t(), b[1:3], b.reshape(24), b.view(2, 12)[:, ::3], b, b.t().t()]

    tensors, unpacked, stats = save_and_unpack(make)
    assert_same(tensors, unpacked)
    assert stats.saved == 7 and stats.stored == 1 and stats.referenced == 6
    assert stats.host_bytes == stats.copied_bytes == 24 * 4  # one copy of b, nothing else


def test_a_reshape_that_copies_is_found_through_the_graph():
    base = torch.randn(6, 4, requires_grad=True)

    def make():
        b = base * 2
        return [b, b.t().reshape(24), (b.t() + 0).contiguous()]  # copies: graph walk + value check

    tensors, unpacked, stats = save_and_unpack(make)
    assert_same(tensors, unpacked)
    assert stats.stored == 1 and stats.referenced == 2  # both are b permuted (and reshaped)
    _, _, far = save_and_unpack(make, max_hops=0)
    assert far.stored == 3 and far.referenced == 0  # 0 hops: only storage identity


def test_a_copy_with_other_values_is_stored():
    base = torch.randn(6, 4, requires_grad=True)

    def make():
        b = (base * 0).abs()  # +0.0 everywhere
        return [b, b.t().reshape(24) + 1, -(b.t().contiguous())]  # -0.0 equals 0.0, but not in bits

    tensors, unpacked, stats = save_and_unpack(make)
    assert_same(tensors, unpacked)
    assert stats.stored == stats.saved == 4 and stats.referenced == 0  # abs() saved its input too


def test_an_inplace_write_between_saves_is_not_confused():
    base = torch.randn(6, 4, requires_grad=True)
    x = torch.zeros(1, requires_grad=True)
    sink: list[torch.Tensor] = []
    with track_saved() as stats, hooks():
        b = base * 2
        Save.apply(x, sink, b)
        with torch.no_grad():
            b.mul_(3)  # b's version moves on: its stored copy no longer describes it
        y2 = Save.apply(x, sink, b)
    assert stats.stored == 2 and stats.referenced == 0
    y2.sum().backward()
    assert bits_equal(sink[0], b.detach())


def test_a_freed_and_reused_address_is_not_confused():
    """Two storages at the same data pointer, the first freed before the second exists."""
    arr = np.arange(24, dtype=np.float32)
    x = torch.zeros(1, requires_grad=True)
    sink: list[torch.Tensor] = []
    with track_saved() as stats, hooks():
        a = torch.from_numpy(arr)  # storage 1 over arr's memory
        ptr, first = a.data_ptr(), StorageWeakRef(a.untyped_storage())
        y1 = Save.apply(x, sink, a)
        del a  # storage 1 is freed (arr's memory stays)
        assert first.expired()
        arr[:] = -arr  # new values at the same address
        b = torch.from_numpy(arr)  # storage 2, same data pointer, same geometry
        assert b.data_ptr() == ptr
        y2 = Save.apply(x, sink, b)
    assert stats.stored == 2 and stats.referenced == 0
    (y1 + y2).sum().backward()
    got = sorted(sink, key=lambda t: float(t.sum()))
    assert torch.equal(got[0], torch.from_numpy(arr)) and torch.equal(got[1], torch.from_numpy(-arr))

"""edkm.memory: spec parsing, bit-identity of M/U with plain DKM, and the saved-bytes stats."""

from __future__ import annotations

import pytest
import torch

import edkm
from edkm.cluster.dkm import dkm_autograd
from edkm.memory import MemoryPlan, dkm_with_memory, parse_memory, track_saved
from edkm.memory.hooks import SavedTensorHooks

K, ITERS, TAU = 8, 3, 1e-4


def weights(shape=(64, 48), seed=0, dtype=torch.bfloat16) -> torch.Tensor:
    torch.manual_seed(seed)
    return (torch.randn(shape) * 0.05).to(torch.bfloat16).to(dtype)


def run(w0, c, memory, iters=ITERS, eps=0.0, hooks_kw=None):
    """Outputs, centroids, weight gradient and stats of one forward + backward."""
    w = w0.clone().requires_grad_()
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    with track_saved() as stats:
        if hooks_kw is None:
            out, cn = edkm.dkm(w, c, tau=TAU, iters=iters, eps=eps, memory=memory)
        else:
            with SavedTensorHooks(parse_memory(memory), w, c, **hooks_kw):
                out, cn = dkm_autograd(w, c, TAU, iters, eps)
            out = out.to(w.dtype)  # as edkm.dkm returns it
    (out.float() * g).sum().backward()
    return (out, cn, w.grad), stats


def assert_bit_identical(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


def test_parse_memory_accepts_every_combination_in_any_order():
    assert parse_memory("plain").plain
    assert parse_memory("shard+unique+marshal") == MemoryPlan(marshal=True, unique=True, shard=True)
    assert str(parse_memory("unique+marshal")) == "marshal+unique"
    assert parse_memory(" marshal + shard ") == MemoryPlan(marshal=True, shard=True)
    assert parse_memory("fused").fused and parse_memory("auto").auto


@pytest.mark.parametrize("spec", ["marshall", "marshal+fused", "auto+shard", "unique+unique", "", "plain+marshal"])
def test_parse_memory_rejects_with_the_valid_names(spec):
    with pytest.raises(ValueError, match="valid: marshal, unique, shard"):
        parse_memory(spec)


def test_auto_resolves_from_the_weights():
    assert parse_memory("auto").resolve(weights(dtype=torch.float32)) == MemoryPlan(fused=True)
    assert parse_memory("auto").resolve(torch.randn(8, 8)) == MemoryPlan(marshal=True)  # no process group


@pytest.mark.parametrize("memory", ["marshal", "unique", "marshal+unique", "unique+marshal"])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bit_identical_to_plain(memory, groups, dtype):
    w = weights(dtype=dtype)
    c = edkm.kmeans1d(w.float(), K, groups=groups) if groups > 1 else edkm.kmeans1d(w.float(), K)[0]
    plain, _ = run(w, c, "plain")
    got, stats = run(w, c, memory)
    assert_bit_identical(plain, got)
    assert stats.saved > 0 and stats.stored < stats.saved  # A saved twice per soft assignment: stored once


@pytest.mark.parametrize("memory", ["marshal", "marshal+unique"])
def test_real_host_copies_are_bit_identical(memory):
    """copy_on_cpu makes every host copy a new storage, as a device run does; originals may be freed."""
    w = weights()
    c = edkm.kmeans1d(w.float(), K)[0]
    plain, _ = run(w, c, "plain")
    got, stats = run(w, c, memory, hooks_kw={"copy_on_cpu": True})
    assert_bit_identical(plain, got)
    assert stats.device_bytes == 0 and stats.host_bytes == stats.copied_bytes > 0


@pytest.mark.parametrize("iters,eps", [(0, 0.0), (5, 1e-3)])
def test_bit_identical_without_updates_and_with_early_stop(iters, eps):
    w = weights()
    c = edkm.kmeans1d(w.float(), K)[0]
    plain, _ = run(w, c, "plain", iters=iters, eps=eps)
    got, _ = run(w, c, "marshal+unique", iters=iters, eps=eps)
    assert_bit_identical(plain, got)


def test_backward_twice_with_retain_graph():
    w = weights().requires_grad_()
    c = edkm.kmeans1d(w.detach().float(), K)[0]
    out, _ = dkm_with_memory(w, c, tau=TAU, iters=2, memory="marshal+unique")
    (g1,) = torch.autograd.grad(out.sum(), w, retain_graph=True)
    (g2,) = torch.autograd.grad(out.sum(), w)
    assert torch.equal(g1, g2)


def test_unique_needs_sixteen_bit_weights():
    w = torch.randn(16, 16, requires_grad=True)
    with pytest.raises(ValueError, match="memory mode 'unique' needs exact 16-bit weights"):
        edkm.dkm(w, torch.linspace(-1, 1, 4), tau=0.01, iters=1, memory="marshal+unique")
    edkm.dkm(w, torch.linspace(-1, 1, 4), tau=0.01, iters=1, memory="marshal")  # M alone takes any weights


def test_stats_plain_m_u_and_save_on_cpu():
    w = weights((256, 256))
    c = edkm.kmeans1d(w.float(), K)[0]
    n, maps = w.numel(), 2 * (ITERS + 1)  # distances and attentions of every soft assignment
    _, plain = run(w, c, "plain")
    _, m = run(w, c, "marshal")
    _, mu = run(w, c, "marshal+unique")
    _, u = run(w, c, "unique")
    with track_saved(save_on_cpu=True) as offload:
        wg = w.clone().requires_grad_()
        out, _ = dkm_autograd(wg, c, TAU, ITERS)
    out.sum().backward()

    assert plain.device_bytes >= maps * n * K * 4 and plain.host_bytes == 0
    assert m.device_bytes == 0 and m.host_bytes == m.copied_bytes  # each storage once: as much as plain holds
    assert m.host_bytes <= plain.device_bytes < 1.01 * m.host_bytes
    assert m.referenced >= ITERS + 1  # A is saved twice per soft assignment
    assert offload.host_bytes > 1.4 * m.host_bytes  # save_on_cpu copies every view again
    assert mu.footprint < plain.footprint / 10 and mu.device_bytes == 0
    assert u.host_bytes == 0 and u.device_bytes < plain.device_bytes / 10
    assert mu.kinds["index"] == n * 2  # one int16 index per weight, shared by every map of the call


def test_track_saved_counts_each_storage_once_and_skips_parameters():
    x = torch.randn(32, 32, requires_grad=True)  # a leaf: held by the graph anyway
    with track_saved() as stats:
        y = x.exp()  # saves its result y (32*32*4 bytes)
        z = (y * y.t()).sum()  # saves y and a view of y: same storage
    z.backward()
    assert stats.saved == 3 and stats.stored == 1 and stats.device_bytes == 32 * 32 * 4


def test_fused_dispatch():
    pytest.importorskip("edkm.memory.fused")
    w = weights()
    c = edkm.kmeans1d(w.float(), K)[0]
    plain, _ = run(w, c, "plain")
    for memory in ("fused", "auto"):
        got, _ = run(w, c, memory)
        for x, y in zip(plain, got):  # float tolerance (docs/method.md §4); outputs are rounded to bf16
            x, y = x.detach().double(), y.detach().double()
            assert float((x - y).norm() / x.norm()) <= 1e-3

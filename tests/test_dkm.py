"""edkm.dkm against an independent float64 formulation of docs/method.md §2, and the 1-D k-means."""

import time

import pytest
import torch

import edkm


def reference_dkm(w, c, tau, iters):
    """docs/method.md §2 written out literally in float64: explicit exp / normalisation, one weight per row."""
    x = w.double().reshape(-1, 1)
    c = c.double().reshape(1, -1)
    for _ in range(iters):
        e = torch.exp(-((x - c) ** 2) / tau - (-((x - c) ** 2) / tau).max(dim=1, keepdim=True).values)
        a = e / e.sum(dim=1, keepdim=True)
        c = ((a * x).sum(0) / a.sum(0)).reshape(1, -1)
    e = torch.exp(-((x - c) ** 2) / tau - (-((x - c) ** 2) / tau).max(dim=1, keepdim=True).values)
    a = e / e.sum(dim=1, keepdim=True)
    return (a @ c.T).reshape(w.shape), c.reshape(-1)


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("bits,iters", [(1, 0), (2, 1), (3, 3), (4, 2), (8, 1)])
def test_dkm_matches_reference_values_and_gradients(bits, iters):
    torch.manual_seed(bits)
    w = torch.randn(48, 40) * 0.02
    c = edkm.kmeans1d(w, 1 << bits)[0]
    tau = float(torch.diff(c).square().median())
    g = torch.randn(48, 40)

    w1 = w.clone().requires_grad_()
    out, c1 = edkm.dkm(w1, c, tau=tau, iters=iters)
    (out * g).sum().backward()

    w2 = w.double().clone().requires_grad_()
    ref, c2 = reference_dkm(w2, c, tau, iters)
    (ref * g.double()).sum().backward()

    assert out.dtype == torch.float32
    assert rel(out, ref) <= 1e-5
    assert rel(c1, c2) <= 1e-5
    assert rel(w1.grad, w2.grad) <= 1e-5


def test_dkm_per_group_equals_separate_calls():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    c = edkm.kmeans1d(w, 4, groups=4)
    out, new = edkm.dkm(w, c, tau=0.01, iters=2)
    for g in range(4):
        part, cg = edkm.dkm(w[2 * g : 2 * g + 2], c[g], tau=0.01, iters=2)
        torch.testing.assert_close(out[2 * g : 2 * g + 2], part, rtol=0, atol=0)
        torch.testing.assert_close(new[g], cg, rtol=0, atol=0)


def test_dkm_early_stop_and_empty_centroid():
    w = torch.tensor([0.0, 0.01, 1.0, 1.01])
    c = torch.tensor([0.0, 1.0, 100.0])  # the last centroid attracts nothing: it must keep its value
    _, new = edkm.dkm(w, c, tau=1e-3, iters=50, eps=1e-6)
    assert torch.isfinite(new).all() and new[2] == 100.0
    with pytest.raises(ValueError, match="iters"):
        edkm.dkm(w, c, tau=1.0, iters=-1)


def test_kmeans1d_beats_quantile_split_and_is_fast():
    torch.manual_seed(0)
    w = (torch.randn(4096, 11008) * 0.02).to(torch.bfloat16)  # a LLaMA-7B MLP matrix
    start = time.perf_counter()
    c = edkm.kmeans1d(w, 8)
    assert time.perf_counter() - start < 20  # about a second on a 2-core CPU (generous bound)
    idx, lut = edkm.hard_assign(w, c)
    sample = w.float().reshape(-1)[:200_000]
    brute = (sample[:, None] - lut[0][None]).square().argmin(1)
    assert torch.equal(brute, idx.reshape(-1)[:200_000].long())
    # Lloyd fixed point: each centroid is the mean of its cluster
    x = w.float().reshape(-1)
    for j in range(8):
        members = x[idx.reshape(-1) == j]
        assert abs(float(members.mean()) - float(lut[0, j])) < 1e-6


def test_kmeans1d_few_distinct_values_and_errors():
    c = edkm.kmeans1d(torch.tensor([1.0, 1.0, 2.0]), 4)
    assert c.tolist()[0][:2] == [1.0, 2.0]
    with pytest.raises(ValueError):
        edkm.kmeans1d(torch.randn(10), 4, groups=3)

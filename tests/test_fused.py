"""Unique-domain DKM (edkm.memory.fused) against the plain autograd DKM of edkm.cluster.dkm."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from edkm.cluster.dkm import dkm_autograd
from edkm.cluster.kmeans import kmeans1d
from edkm.cluster.sixteen import bit_patterns
from edkm.memory.domain import patterns as _patterns
from edkm.memory.fused import fused_dkm

TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make_case(shape, bits, groups, seed=0):
    """bf16 weights, perturbed k-means centroids (so the updates move them) and a tau relative to the variance."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)
    k = 2**bits
    if groups <= 4:
        c = kmeans1d(w, k, groups=groups)
    else:  # equal-mass quantiles: k-means of many small groups would dominate the test time
        q = (torch.arange(k, dtype=torch.float32) + 0.5) / k
        c = torch.quantile(w.float().reshape(groups, -1), q, dim=1).T.contiguous()
    c = c + 0.1 * w.float().std() * torch.randn(c.shape, generator=gen)
    var = w.float().reshape(groups, -1).var(dim=1)
    if groups == 1:
        return w, c[0], float(0.05 * var[0])
    return w, c, 0.05 * var if groups != 4 else torch.tensor([0.02, 0.05, 0.1, 0.2]) * var


def run_both(w, c, tau, iters, eps=0.0, kind="bf16", seed=1, c_grad=True):
    """Forward+backward of fused (on ``kind`` weights) and plain DKM (fp32 leaf of the same values)."""
    wf = (w if kind == "bf16" else w.float()).clone().requires_grad_()
    wp = w.float().clone().requires_grad_()
    cf, cp = c.clone().requires_grad_(c_grad), c.clone().requires_grad_(c_grad)
    of, cof = fused_dkm(wf, cf, tau=tau, iters=iters, eps=eps)
    op, cop = dkm_autograd(wp, cp, tau, iters, eps)
    gen = torch.Generator().manual_seed(seed)
    r, rc = torch.randn(op.shape, generator=gen), torch.randn(cop.shape, generator=gen)
    ((of * r).sum() + (cof * rc).sum()).backward()
    ((op * r).sum() + (cop * rc).sum()).backward()
    return (of, cof, wf, cf), (op, cop, wp, cp)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_matches_dkm_autograd(bits, iters, groups):
    w, c, tau = make_case((48, 80), bits, groups, seed=bits * 10 + iters)
    grads = {}
    for kind in ("fp32", "bf16"):
        (of, cof, wf, cf), (op, cop, wp, cp) = run_both(w, c, tau, iters, kind=kind)
        assert of.dtype == torch.float32 and of.shape == w.shape
        assert cof.dtype == torch.float32 and cof.shape == c.shape
        assert wf.grad.dtype == wf.dtype  # the gradient arrives in the weights' dtype
        assert rel(of, op) < TOL
        assert rel(cof, cop) < TOL
        assert rel(cf.grad, cp.grad) < TOL
        grads[kind] = wf.grad
    # fp32 math: the fp32-holding-bf16 gradient matches plain DKM's ...
    assert rel(grads["fp32"], wp.grad) < TOL
    # ... and the bf16 gradient is exactly that fp32 gradient rounded to bf16.
    assert torch.equal(grads["bf16"], grads["fp32"].to(torch.bfloat16))
    assert rel(grads["bf16"], wp.grad) < 2**-8  # bf16 rounding


def test_fp16_weights():
    w, c, tau = make_case((32, 40), 3, 1)
    w16 = w.float().to(torch.float16).requires_grad_()
    wp = w16.detach().float().requires_grad_()
    of, cof = fused_dkm(w16, c, tau=tau, iters=2)
    op, cop = dkm_autograd(wp, c, tau, 2)
    of.sum().backward()
    op.sum().backward()
    assert w16.grad.dtype == torch.float16
    assert rel(of, op) < TOL and rel(cof, cop) < TOL
    assert rel(w16.grad, wp.grad) < 2**-10


@pytest.mark.parametrize("groups", [1, 4])
def test_early_stop(groups):
    w, c, tau = make_case((64, 64), 3, groups, seed=3)
    # choose eps halfway (geometrically) between the 4th and 5th update's max|delta c|: stops after 5 updates
    deltas, prev = [], c.float()
    for it in range(1, 6):
        cur = dkm_autograd(w.float(), c, tau, it)[1]
        deltas.append(float((cur - prev).abs().max()))
        prev = cur
    assert deltas[4] < deltas[3] and all(d > deltas[3] for d in deltas[:3])
    eps = (deltas[3] * deltas[4]) ** 0.5
    (of, cof, wf, cf), (op, cop, wp, cp) = run_both(w, c, tau, 40, eps=eps, kind="fp32")
    again, _ = fused_dkm(w.float().requires_grad_(), c, tau=tau, iters=40, eps=eps)
    saved_centroids = again.grad_fn.saved_tensors[1]  # (updates + 1, G, k)
    assert saved_centroids.shape[0] == 6  # stopped after 5 updates, as plain DKM does
    assert rel(of, op) < TOL and rel(cof, cop) < TOL
    assert rel(wf.grad, wp.grad) < TOL and rel(cf.grad, cp.grad) < TOL
    full, _ = fused_dkm(w, c, tau=tau, iters=40)
    assert not torch.equal(full, of)  # without eps it runs all 40 updates


def test_repeated_values_signed_zeros_fewer_than_k():
    gen = torch.Generator().manual_seed(5)
    palette = torch.tensor([-0.0, 0.0, 0.015625, -0.03125, 0.046875])  # 5 distinct bit patterns, 4 values
    w = palette[torch.randint(0, 5, (40, 30), generator=gen)].to(torch.bfloat16)
    assert (w.view(torch.int16) == torch.tensor(-0.0).to(torch.bfloat16).view(torch.int16)).any()
    c = torch.linspace(-0.04, 0.06, 8)  # k = 8 > 4 distinct values
    for kind in ("bf16", "fp32"):
        for iters in (0, 1, 3):
            (of, cof, wf, cf), (op, cop, wp, cp) = run_both(w, c, 1e-4, iters, kind=kind)
            assert rel(of, op) < TOL and rel(cof, cop) < TOL and rel(cf.grad, cp.grad) < TOL
            if kind == "fp32":
                assert rel(wf.grad, wp.grad) < TOL
    # +0 and -0 are two bit patterns of one value: same output, and with a uniform upstream gradient the same
    # gradient, as plain DKM gives them
    wf = w.clone().requires_grad_()
    out, _ = fused_dkm(wf, c, tau=1e-4, iters=3)
    out.sum().backward()
    zeros = w == 0
    assert torch.all(out[zeros] == out[zeros][0]) and torch.all(wf.grad[zeros] == wf.grad[zeros][0])


def test_empty_centroid_far_from_all_weights():
    w, c, tau = make_case((32, 48), 3, 1, seed=7)
    c = c.clone()
    c[-1] = 10.0  # attention underflows to exactly 0: mass 0, the centroid keeps its value
    for kind in ("bf16", "fp32"):
        (of, cof, wf, cf), (op, cop, wp, cp) = run_both(w, c, tau, 3, kind=kind)
        assert float(cof[-1].detach()) == 10.0 == float(cop[-1].detach())
        assert torch.isfinite(wf.grad.float()).all() and torch.isfinite(cf.grad).all()
        assert rel(of, op) < TOL and rel(cof, cop) < TOL and rel(cf.grad, cp.grad) < TOL
        if kind == "fp32":
            assert rel(wf.grad, wp.grad) < TOL


@pytest.mark.parametrize("shape,groups,bits", [((64, 50), 64, 2), ((20, 8192), 20, 2), ((7, 3, 5), 7, 4)])
def test_many_groups(shape, groups, bits):
    """Small groups (sorted keys, chunks spanning groups) and several dense batches of groups."""
    w, c, _ = make_case(shape, bits, groups, seed=11)
    tau = (0.02 + 0.2 * torch.rand(groups, generator=torch.Generator().manual_seed(0))) * w.float().var()
    (of, cof, wf, cf), (op, cop, wp, cp) = run_both(w, c, tau, 2, kind="fp32")
    assert rel(of, op) < TOL and rel(cof, cop) < TOL
    assert rel(wf.grad, wp.grad) < TOL and rel(cf.grad, cp.grad) < TOL


def test_gradient_paths():
    """Only the centroids used (no W_hat gradient), an expanded gradient, constant centroids."""
    w, c, tau = make_case((40, 40), 3, 1, seed=2)
    wf, wp = w.float().clone().requires_grad_(), w.float().clone().requires_grad_()
    (fused_dkm(wf, c, tau=tau, iters=2)[1] ** 2).sum().backward()
    (dkm_autograd(wp, c, tau, 2)[1] ** 2).sum().backward()
    assert rel(wf.grad, wp.grad) < TOL
    wf.grad = wp.grad = None
    fused_dkm(wf, c, tau=tau, iters=2)[0].sum().backward()  # expanded (stride-0) incoming gradient
    dkm_autograd(wp, c, tau, 2)[0].sum().backward()
    assert rel(wf.grad, wp.grad) < TOL
    # weights without grad, centroids with grad
    cf, cp = c.clone().requires_grad_(), c.clone().requires_grad_()
    fused_dkm(w, cf, tau=tau, iters=2)[0].square().sum().backward()
    dkm_autograd(w.float(), cp, tau, 2)[0].square().sum().backward()
    assert rel(cf.grad, cp.grad) < TOL


def test_rejects_non_16bit_and_bad_shapes():
    c = torch.linspace(-1, 1, 4)
    with pytest.raises(ValueError, match="16-bit"):
        fused_dkm(torch.randn(10, 10), c, tau=0.1, iters=1)
    w = torch.randn(10, 10).to(torch.bfloat16)
    with pytest.raises(ValueError, match="equal groups"):
        fused_dkm(w, c.expand(3, 4), tau=0.1, iters=1)
    with pytest.raises(ValueError, match="tau"):
        fused_dkm(w, c.expand(4, 4), tau=torch.ones(3), iters=1)
    with pytest.raises(ValueError, match="iters"):
        fused_dkm(w, c, tau=0.1, iters=-1)


def test_patterns_are_bit_patterns():
    w = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("nan")]).to(torch.bfloat16)
    assert torch.equal(_patterns(w, torch.bfloat16).long(), bit_patterns(w, torch.bfloat16))


def _saved_bytes(fn, weights):
    """Bytes autograd saves during ``fn()``, split into (references to ``weights``' storage, everything else)."""
    ref = other = 0
    wptr = weights.untyped_storage().data_ptr()

    def pack(t):
        nonlocal ref, other
        if t.untyped_storage().data_ptr() == wptr:
            ref += t.untyped_storage().nbytes()
        else:
            other += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return ref, other, out


@pytest.mark.parametrize("groups", [1, 4])
def test_saves_only_centroids_per_iteration(groups):
    iters, k = 3, 16
    w = (torch.randn(256, 512) * 0.02).to(torch.bfloat16).requires_grad_()
    c = torch.linspace(-0.05, 0.05, k).expand(groups, k).contiguous()
    tau = 1e-4
    ref, other, (out, _) = _saved_bytes(lambda: fused_dkm(w, c, tau=tau, iters=iters), w)
    assert ref == w.numel() * 2  # the weights themselves: a reference, not a copy
    # centroids of every iteration (fp32) + masses of every update (fp64) + tau
    assert other <= (iters + 1) * groups * k * 4 + iters * groups * k * 8 + groups * 4
    _, plain, _ = _saved_bytes(lambda: dkm_autograd(w, c, tau, iters), w)
    assert plain >= w.numel() * k * 4 * (iters + 1)  # the |W| x |C| maps of plain DKM
    out.sum().backward()  # the saved state suffices for backward


_EMBEDDING_SCRIPT = textwrap.dedent(
    """
    import json, resource, time, torch
    from edkm.memory.fused import fused_dkm

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    torch.manual_seed(0)
    w = torch.empty(32000, 4096, dtype=torch.bfloat16)
    for i in range(0, 32000, 1000):  # no full-size fp32 temporary
        w[i : i + 1000] = torch.randn(1000, 4096) * 0.02
    w.requires_grad_()
    c = torch.sort(torch.randn(256) * 0.02).values
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    base = status("VmRSS")
    cpu0, t0 = time.process_time(), time.perf_counter()
    w_hat, c_new = fused_dkm(w, c, tau=0.05 * 0.02**2, iters=1)
    t1 = time.perf_counter()
    fwd_peak = status("VmHWM") - base
    w_hat.sum().backward()
    t2 = time.perf_counter()
    print(json.dumps({
        "peak_extra_bytes": status("VmHWM") - base, "forward_peak_extra_bytes": fwd_peak,
        "output_bytes": w_hat.numel() * w_hat.element_size(), "grad_bytes": w.grad.numel() * w.grad.element_size(),
        "forward_s": t1 - t0, "backward_s": t2 - t1, "cpu_s": time.process_time() - cpu0,
        "finite": bool(torch.isfinite(w.grad).all()),
    }))
    """
)


@pytest.mark.slow
def test_llama_embedding_8bit_memory():
    """32000 x 4096 bf16 embedding, 256 centroids, iters=1: forward+backward peak RSS increase < 1 GB.

    The increase includes the fp32 output (524 MB) and the bf16 weight gradient (262 MB); the
    transient tables are a few tens of MB.
    """
    proc = subprocess.run([sys.executable, "-c", _EMBEDDING_SCRIPT], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["finite"]
    assert result["peak_extra_bytes"] < 1e9

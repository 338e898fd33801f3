"""A clustered layer holds what plain fine-tuning holds (input, Parameter) plus O(tables), nothing |W|-sized."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import edkm
from edkm.cluster.sixteen import cast_straight_through
from edkm.memory.layer import cluster_weight, clustered_linear
from edkm.memory.modes import dkm


def saved_bytes_beyond(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves during ``model(x)`` beyond x's and the parameters' storages (each storage once)."""
    skip = {StorageWeakRef(t.untyped_storage()).cdata for t in [x, *model.parameters()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(t.untyped_storage()).cdata
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(seen.values()), out


def master_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)  # fp32 master weights, not 16-bit values
    return model


@pytest.mark.parametrize("group_size", [None, 64])
def test_linear_saves_only_tables_beyond_input_and_parameter(group_size):
    lin = master_weights(nn.Linear(1024, 1024))
    w_bytes = lin.weight.numel() * 4
    model = edkm.palettize_(nn.Sequential(lin), edkm.PalettizeConfig(bits=3, group_size=group_size))
    x = torch.randn(8, 1024, requires_grad=True)
    model(x).sum().backward()  # first step: k-means init
    extra, out = saved_bytes_beyond(model, x)
    assert extra <= w_bytes / 8, f"{extra} bytes saved beyond input and Parameter: O(|W|) ({w_bytes})"
    groups = 1 if group_size is None else 1024 // group_size
    assert extra <= 16 * 65536 * groups + 64 * 8 * groups * 8  # pair domain + W_hat table + per-iteration centroids
    out.sum().backward()
    assert lin.weight.grad is not None


def test_embedding_saves_only_tables_beyond_indices_and_parameter():
    emb = master_weights(nn.Embedding(4096, 256))
    model = edkm.palettize_(nn.Sequential(emb), edkm.PalettizeConfig(bits=8))
    x = torch.randint(0, 4096, (2, 64))
    model(x).sum().backward()
    extra, _ = saved_bytes_beyond(model, x)
    assert extra <= emb.weight.numel() * 4 / 16


class _LargeOutputs(TorchDispatchMode):
    """Weak references to the storage of every op output with >= ``size`` elements."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.refs = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.size:
                self.refs.append((StorageWeakRef(t.untyped_storage()), tuple(t.shape), str(func)))
        return out


@pytest.mark.parametrize("memory", ["auto", "plain", "marshal+unique"])
def test_nothing_weight_sized_alive_after_backward_and_step(memory):
    model = master_weights(nn.Sequential(nn.Embedding(512, 128), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 512)))
    model[3].weight = model[0].weight  # tied head
    edkm.palettize_(model, edkm.PalettizeConfig(bits=3, overrides={"0|3": {"bits": 6}}), memory=memory)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (1, 16))  # activations stay below the smallest weight (128 x 128)
    for _ in range(2):  # step 1 initialises the centroids and the optimizer state
        with _LargeOutputs(128 * 128) as mode:
            loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
            loss.backward()
            opt.step()
        opt.zero_grad()
    keep = {
        StorageWeakRef(t.untyped_storage()).cdata
        for p in model.parameters()
        for t in [p, *opt.state[p].values()]
        if torch.is_tensor(t)
    }
    alive = [(shape, op) for ref, shape, op in mode.refs if not ref.expired() and ref.cdata not in keep]
    assert loss.grad_fn is not None  # the graph is still referenced, as in a training loop
    assert not alive, f"|W|-sized tensors alive after backward and step: {alive}"
    assert all(m.scope.entries is None for m in model.modules() if isinstance(m, edkm.layers.dkm.ClusteredWeight))


def reference_linear(w: torch.Tensor, c: torch.Tensor, x: torch.Tensor, tau: float, memory: str) -> torch.Tensor:
    """The pre-existing path: straight-through cast, edkm.dkm, F.linear (which keeps W_hat)."""
    w_hat, _ = dkm(cast_straight_through(w), c, tau=tau, iters=3, memory=memory)
    return F.linear(x, w_hat.to(w.dtype))


@pytest.mark.parametrize("memory", ["plain", "marshal", "unique", "marshal+unique", "fused"])
def test_modes_match_plain_dkm_on_fp32_master_weights(memory):
    gen = torch.Generator().manual_seed(1)
    w = nn.Parameter(torch.randn(96, 64, generator=gen) * 0.02)
    x = torch.randn(5, 64, generator=gen, requires_grad=True)
    c = edkm.kmeans1d(w.detach().bfloat16(), 8)[0] * 1.05
    g = torch.randn(5, 96, generator=gen)
    grads = []
    for path in ("reference", "layer"):
        w.grad = x.grad = None
        if path == "reference":
            y = reference_linear(w, c, x, 1e-5, "plain")
        else:
            y = clustered_linear(x, cluster_weight(w, c, tau=1e-5, iters=3, memory=memory))
        y.backward(g)
        grads.append((y.detach(), w.grad.clone(), x.grad.clone()))
    for got, want in zip(grads[1], grads[0]):
        if memory == "fused":
            assert float((got - want).norm() / want.norm()) < 1e-4
        else:
            assert torch.equal(got, want)  # bit-identical, as before


def test_grouped_kmeans_matches_one_group_at_a_time():
    from edkm.cluster.kmeans import kmeans1d

    w = (torch.randn(256, 64, generator=torch.Generator().manual_seed(3)) * 0.02).bfloat16()
    w[5] = 0.25  # one distinct value: every centroid takes it
    together = kmeans1d(w, 8, groups=256)
    alone = torch.cat([kmeans1d(row, 8) for row in w])

    def sse(c: torch.Tensor) -> torch.Tensor:
        return (w.double().unsqueeze(-1) - c.double().unsqueeze(1)).square().min(-1).values.sum(1)

    assert torch.equal(together[5], alone[5])
    assert (sse(together) <= sse(alone) * 1.01 + 1e-12).all()
    assert (together == alone).all(1).float().mean() > 0.9  # mostly the very same local optimum


def test_fused_layer_kernels_match_plain_dkm():
    from edkm.memory.fused_layer import fused_embedding, fused_linear

    gen = torch.Generator().manual_seed(2)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    w, b = nn.Parameter(torch.randn(300, 200, generator=gen) * 0.02), nn.Parameter(torch.randn(300, generator=gen))
    c = edkm.kmeans1d(w.detach().bfloat16(), 8)[0] * 1.03
    x, g = torch.randn(2, 7, 200, generator=gen, requires_grad=True), torch.randn(2, 7, 300, generator=gen)
    results = []
    for fused in (True, False):
        w.grad = b.grad = x.grad = None
        if fused:
            y, _ = fused_linear(x, w, b, c, tau=1e-5, iters=3)
        else:
            y = F.linear(x, cluster_weight(w, c, tau=1e-5, iters=3, memory="plain").w_hat, b)
        y.backward(g)
        results.append([y.detach(), w.grad.clone(), x.grad.clone(), b.grad.clone()])
    assert all(rel(a, b) < 1e-4 for a, b in zip(*results))
    emb = nn.Parameter(torch.randn(500, 64, generator=gen) * 0.02)
    c8 = edkm.kmeans1d(emb.detach().bfloat16(), 64)[0]
    ids, g = torch.randint(0, 500, (3, 9), generator=gen), torch.randn(3, 9, 64, generator=gen)
    ids[0, :2] = 3  # padding rows get no gradient
    results = []
    for fused in (True, False):
        emb.grad = None
        if fused:
            y, _ = fused_embedding(ids, emb, c8, tau=1e-6, iters=3, padding_idx=3)
        else:
            y = F.embedding(ids, cluster_weight(emb, c8, tau=1e-6, iters=3, memory="plain").w_hat, padding_idx=3)
        y.backward(g)
        results.append([y.detach(), emb.grad.clone()])
    assert all(rel(a, b) < 1e-4 for a, b in zip(*results))

"""Unique-domain DKM fused into the layer op: a clustered Linear / Embedding that never builds W_hat.

For one LUT per tensor (the default) the clustered weight is a 65,536-entry table indexed by each
weight's bf16/fp16 bit pattern, so the layer can use it row block by row block:

* :func:`fused_linear`: forward counts the patterns (one pass), runs the DKM updates on the
  pairs, then for each block of output rows gathers W_hat's rows and multiplies; backward gathers
  the rows again for grad_x, writes grad_W_hat into the weight-gradient buffer while bucketing it
  by pattern, then turns that buffer into dL/dW = g F(w) + R(w) in place. Four passes over the
  weights per step, transient memory O(block), the gradient buffer plain fine-tuning has anyway.
* :func:`fused_embedding`: forward counts the patterns and gathers only the looked-up rows;
  backward buckets only those rows' gradients and writes R(w) (one pass) plus g F(w) on them.

Saved for backward: the input (or token ids), the Parameter by reference, centroids and masses of
every update, tau, the pair domain (12 bytes per pair) and the 65,536-entry W_hat table. Values and
gradients equal :func:`edkm.memory.fused.fused_dkm` (hence plain DKM) to float tolerance.

Example:
    >>> import torch
    >>> from edkm.memory.fused_layer import fused_linear
    >>> w = torch.nn.Parameter(torch.randn(64, 256)); x = torch.randn(3, 256, requires_grad=True)
    >>> y, c = fused_linear(x, w, None, torch.linspace(-2, 2, 8), tau=0.05, iters=3)
    >>> y.sum().backward(); w.grad.shape, c.shape
    (torch.Size([64, 256]), torch.Size([8]))
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from edkm.memory.domain import PATTERNS, Domain, patterns
from edkm.memory.fused import backward_tables, final_table, run_updates

__all__ = ["fused_linear", "fused_embedding", "supports"]

_BLOCK = 1 << 20  # weights per row block


def supports(weight: torch.Tensor, centroids: torch.Tensor) -> bool:
    """Whether the fused layer ops apply: one LUT per tensor of >= 8,192 weights (a dense pair domain)."""
    return (centroids.dim() == 1 or centroids.shape[0] == 1) and weight.dim() == 2 and weight.numel() * 8 >= PATTERNS


def _dense(dom: Domain, table: torch.Tensor) -> torch.Tensor:
    """A per-pair table as 65,536 entries indexed by bit pattern (absent patterns 0, never read)."""
    full = torch.zeros(PATTERNS, dtype=torch.float32, device=table.device)
    full[dom.present[0][2]] = table.float()
    return full


def _blocks(weight: torch.Tensor):
    rows = max(1, _BLOCK // max(1, weight.shape[1]))
    for r0 in range(0, weight.shape[0], rows):
        yield r0, min(r0 + rows, weight.shape[0])


def _gather(full: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``full`` looked up at the bit patterns of ``weight`` (2-D), same shape."""
    return full.index_select(0, patterns(weight, dtype).reshape(-1)).view(weight.shape)


def _forward_dkm(weight, centroids, tau, iters, eps, dtype):
    c = centroids.detach().float().reshape(1, -1)
    dom = Domain(weight.detach().reshape(1, -1), dtype)
    cs, masses = run_updates(dom, c, tau, iters, eps)
    full = _dense(dom, final_table(dom, cs[-1], tau))
    mass_stack = torch.stack(masses) if masses else c.new_zeros((0, *c.shape), dtype=torch.float64)
    return dom, torch.stack(cs), mass_stack, full


def _backward_dkm(weight, dtype, cs, masses, tau, keys, counts, gsum_full):
    """Dense F and R tables from the bucketed gradient (65,536 fp64 entries)."""
    dom = Domain(weight.detach().reshape(1, -1), dtype, saved=(keys, counts))
    dom.gsum = gsum_full[dom.present[0][2]]
    gc = torch.zeros(cs.shape[1:], dtype=torch.float64, device=cs.device)
    f, r, _ = backward_tables(dom, cs, masses, tau, gc, True, True)
    return _dense(dom, f), _dense(dom, r)


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, centroids, tau, iters, eps, dtype, new_centroids):  # type: ignore[override]
        dom, cs, masses, full = _forward_dkm(weight, centroids, tau, iters, eps, dtype)
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        for r0, r1 in _blocks(weight):
            out[:, r0:r1] = x2 @ _gather(full, weight[r0:r1], dtype).to(x.dtype).t()
        if bias is not None:
            out += bias
        keys, counts = dom.saved()
        ctx.save_for_backward(x, weight, cs, masses, tau, keys, counts, full)
        ctx.dtype, ctx.has_bias = dtype, bias is not None
        new_centroids.append(cs[-1].reshape(centroids.shape).clone())
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, cs, masses, tau, keys, counts, full = ctx.saved_tensors
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = torch.zeros_like(x2) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        gsum = torch.zeros(PATTERNS, dtype=torch.float64, device=weight.device)
        for r0, r1 in _blocks(weight):
            key = patterns(weight[r0:r1], ctx.dtype).reshape(-1)
            if grad_x is not None:
                grad_x.addmm_(g2[:, r0:r1], full.index_select(0, key).view(r1 - r0, -1).to(g2.dtype))
            block = torch.mm(g2[:, r0:r1].t(), x2.to(g2.dtype), out=grad_w[r0:r1])  # dL/dW_hat, in the gradient buffer
            gsum.index_add_(0, key, block.reshape(-1).to(torch.float64))
        f, r = _backward_dkm(weight, ctx.dtype, cs, masses, tau, keys, counts, gsum)
        for r0, r1 in _blocks(weight):  # dL/dw = g F(w) + R(w), in place
            block = grad_w[r0:r1]
            block.mul_(_gather(f, weight[r0:r1], ctx.dtype)).add_(_gather(r, weight[r0:r1], ctx.dtype))
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = grad_x.view(x.shape) if grad_x is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class _FusedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, centroids, tau, iters, eps, dtype, padding_idx, new_centroids):  # type: ignore[override]
        dom, cs, masses, full = _forward_dkm(weight, centroids, tau, iters, eps, dtype)
        rows = weight.detach().index_select(0, ids.reshape(-1))
        out = _gather(full, rows, dtype).to(weight.dtype)
        keys, counts = dom.saved()
        ctx.save_for_backward(ids, weight, cs, masses, tau, keys, counts)
        ctx.dtype, ctx.padding_idx = dtype, padding_idx
        new_centroids.append(cs[-1].reshape(centroids.shape).clone())
        return out.view(*ids.shape, weight.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        ids, weight, cs, masses, tau, keys, counts = ctx.saved_tensors
        flat_ids, g2 = ids.reshape(-1), grad.reshape(-1, weight.shape[1])
        if ctx.padding_idx is not None:
            g2 = g2 * (flat_ids != ctx.padding_idx).unsqueeze(1).to(g2.dtype)
        rows = weight.detach().index_select(0, flat_ids)
        key = patterns(rows, ctx.dtype).reshape(-1)
        gsum = torch.zeros(PATTERNS, dtype=torch.float64, device=weight.device)
        gsum.index_add_(0, key, g2.reshape(-1).to(torch.float64))
        f, r = _backward_dkm(weight, ctx.dtype, cs, masses, tau, keys, counts, gsum)
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        for r0, r1 in _blocks(weight):  # R(w) everywhere: the centroid paths reach every weight
            torch.index_select(r, 0, patterns(weight[r0:r1], ctx.dtype).reshape(-1), out=grad_w[r0:r1].view(-1))
        grad_w.index_add_(0, flat_ids, (g2 * f.index_select(0, key).view(rows.shape)).to(weight.dtype))
        return None, grad_w, None, None, None, None, None, None, None


def _tau(tau: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(tau.detach() if torch.is_tensor(tau) else tau, dtype=torch.float32).to(device).reshape(1)


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    centroids: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    iters: int,
    eps: float = 0.0,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x @ W_hat^T + bias`` with W_hat the DKM of ``weight`` rounded to ``dtype``; returns (output, new centroids).

    ``centroids`` (k,) or (1, k); ``weight`` 2-D with >= 8,192 entries (see :func:`supports`).
    """
    if not supports(weight, centroids):
        raise ValueError(
            f"fused_linear needs one LUT per tensor and >= 8,192 weights, got {tuple(weight.shape)}, "
            f"centroids {tuple(centroids.shape)}"
        )
    new: list[torch.Tensor] = []
    out = _FusedLinear.apply(x, weight, bias, centroids, _tau(tau, weight.device), int(iters), float(eps), dtype, new)
    return out, new[0]


def fused_embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    iters: int,
    eps: float = 0.0,
    dtype: torch.dtype = torch.bfloat16,
    padding_idx: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.embedding(ids, W_hat, padding_idx)`` with W_hat the DKM of ``weight``; returns (rows, new centroids)."""
    if not supports(weight, centroids):
        raise ValueError(f"fused_embedding needs one LUT per tensor and >= 8,192 weights, got {tuple(weight.shape)}")
    new: list[torch.Tensor] = []
    out = _FusedEmbedding.apply(
        ids, weight, centroids, _tau(tau, weight.device), int(iters), float(eps), dtype, padding_idx, new
    )
    return out, new[0]

"""Clustering a layer's weight at the cost of plain fine-tuning (the core of ``palettize_``).

:func:`cluster_weight` runs DKM on a layer's master weight (fp32 or 16-bit) and returns the
clustered weight W_hat together with what rebuilds it; :func:`clustered_linear` computes
``x @ W_hat^T + b`` without keeping W_hat for backward (it recomputes it, by a gather, when the
input gradient needs it). What a clustered Linear then holds for backward is what plain
fine-tuning holds (its input; the weight Parameter, by reference) plus the small tables:

* memory "fused" (and "auto", which is fused here since the weight is rounded to 16 bits on the
  fly): the pair domain and the W_hat table, O(G x 65,536) numbers, nothing of size |W|;
* the paper modes ("plain", M/U/S combinations): whatever that mode keeps of the |W| x |C| maps,
  plus the final centroids; W_hat is recomputed from them (same ops, same bits).

Nothing outlives backward: every tensor is saved through ``save_for_backward`` (so saved-tensor
hooks see and may move it) and freed with the graph's buffers.

Example:
    >>> import torch
    >>> from edkm.memory.layer import cluster_weight, clustered_linear
    >>> weight = torch.nn.Parameter(torch.randn(32, 16))     # fp32 master weight
    >>> cw = cluster_weight(weight, torch.linspace(-2, 2, 8), tau=0.01, iters=3)
    >>> y = clustered_linear(torch.randn(4, 16, requires_grad=True), cw)
    >>> y.sum().backward(); weight.grad.shape, cw.centroids.shape
    (torch.Size([32, 16]), torch.Size([8]))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from edkm.cluster.dkm import final_assignment, group_tau, group_view
from edkm.cluster.sixteen import cast_straight_through
from edkm.memory.fused import fused_dkm, fused_recompute
from edkm.memory.modes import dkm
from edkm.memory.plan import MemoryPlan, parse_memory

__all__ = ["Clustered", "cluster_weight", "clustered_linear"]

Recompute = Callable[..., torch.Tensor]  # recompute(weight, *tables) -> W_hat (no grad)


@dataclass
class Clustered:
    """A clustered weight: ``w_hat`` (differentiable w.r.t. the master weight, its dtype and shape),
    the detached new ``centroids`` (shape of the given ones), and ``recompute(weight, *tables)``
    giving ``w_hat``'s values again from the small ``tables``."""

    weight: torch.Tensor
    w_hat: torch.Tensor
    centroids: torch.Tensor
    recompute: Recompute
    tables: list[torch.Tensor] = field(default_factory=list)

    def again(self) -> torch.Tensor:
        """W_hat recomputed (no grad), bit-identical to ``w_hat``."""
        with torch.no_grad():
            return self.recompute(self.weight, *self.tables)

    def replaced(self, w_hat: torch.Tensor, recompute: Recompute, tables: list[torch.Tensor]) -> Clustered:
        """The same clustering with another forward value (e.g. the hard weights) and its recompute."""
        return Clustered(self.weight, w_hat, self.centroids, recompute, tables)


def _autograd_recompute(
    groups: int, dtype: torch.dtype, tau: float | None, weight: torch.Tensor, c: torch.Tensor, *tau_t: torch.Tensor
) -> torch.Tensor:
    w16 = weight.detach() if weight.dtype == dtype else weight.detach().to(dtype).to(weight.dtype)
    x, cg = group_view(w16, c.reshape(groups, -1))
    w_hat = final_assignment(x, cg, tau if tau is not None else group_tau(tau_t[0]))
    return w_hat.reshape(weight.shape).to(w16.dtype).to(weight.dtype)


def cluster_weight(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    iters: int,
    eps: float = 0.0,
    dtype: torch.dtype = torch.bfloat16,
    memory: str | MemoryPlan = "auto",
) -> Clustered:
    """DKM of ``weight`` rounded to ``dtype`` (gradient straight through), warm-started at ``centroids``.

    Args:
        weight: the master weight (any float dtype and shape); rows split into G equal groups when
            ``centroids`` is (G, k).
        centroids, tau, iters, eps: as :func:`edkm.dkm` (tau absolute; float or (G,) tensor).
        dtype: the 16-bit type clustering sees (bf16 or fp16).
        memory: "auto" / "fused" (unique-domain DKM on the fly, the default) or a paper mode
            ("plain", "marshal", "unique", "shard", "+"-joined).

    Returns:
        :class:`Clustered`; use ``w_hat`` directly (e.g. ``F.embedding``, which keeps only its
        indices) or through :func:`clustered_linear`, which does not keep it.
    """
    plan = memory if isinstance(memory, MemoryPlan) else parse_memory(memory)
    groups = centroids.shape[0] if centroids.dim() == 2 else 1
    if plan.fused or plan.auto:  # rounded to 16 bits here: "auto" is fused, whatever the rank
        tables: list[torch.Tensor] = []
        w_hat, c = fused_dkm(
            weight, centroids, tau=tau, iters=iters, eps=eps, out_dtype=weight.dtype, dtype=dtype, tables=tables
        )
        return Clustered(
            weight,
            w_hat,
            c.detach(),
            partial(fused_recompute, groups=groups, dtype=dtype, out_dtype=weight.dtype),
            tables,
        )
    w16 = weight if weight.dtype == dtype else cast_straight_through(weight, dtype)
    w_hat, c = dkm(w16, centroids, tau=tau, iters=iters, eps=eps, memory=str(plan))
    tau_float = None if torch.is_tensor(tau) else tau
    tables = [c.detach()] + ([] if tau_float is not None else [torch.as_tensor(tau).detach()])
    return Clustered(
        weight, w_hat.to(weight.dtype), c.detach(), partial(_autograd_recompute, groups, dtype, tau_float), tables
    )


class _LinearRecompute(torch.autograd.Function):
    """``F.linear(x, w_hat, bias)`` saving x and the tables, not w_hat (rebuilt for grad_x)."""

    @staticmethod
    def forward(ctx, x, w_hat, bias, weight, recompute, *tables):  # type: ignore[override]
        ctx.recompute = recompute
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, *tables)
        return F.linear(x, w_hat, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, *tables = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(ctx.recompute(weight, *tables).to(grad.dtype))
        if ctx.needs_input_grad[1]:
            grad_w = flat.t().mm(x.reshape(-1, x.shape[-1]).to(grad.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        ctx.recompute = None
        return (grad_x, grad_w, grad_b, None, None, *([None] * len(tables)))


def clustered_linear(x: torch.Tensor, clustered: Clustered, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, clustered.w_hat, bias)`` holding for backward x and the tables, never W_hat."""
    if not (torch.is_grad_enabled() and clustered.w_hat.requires_grad):
        return F.linear(x, clustered.w_hat, bias)
    return _LinearRecompute.apply(x, clustered.w_hat, bias, clustered.weight, clustered.recompute, *clustered.tables)

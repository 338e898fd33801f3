"""``dkm``: differentiable k-means of one tensor under any eDKM memory mode (docs/method.md §2-§4).

"plain" runs :func:`edkm.cluster.dkm.dkm_autograd` as it is; "marshal", "unique", "shard" and their
"+"-joined combinations run it under :class:`~edkm.memory.hooks.SavedTensorHooks`; "fused" computes it in
the unique domain (:func:`edkm.memory.fused.fused_dkm`); "auto" picks fused for exact 16-bit weights.

Example:
    >>> import torch, edkm
    >>> w = torch.randn(64, 32).to(torch.bfloat16).float().requires_grad_()  # "unique" needs exact 16-bit values
    >>> c = edkm.kmeans1d(w.detach(), 8)
    >>> w_hat, c_new = edkm.dkm(w, c, tau=1e-3, iters=3, memory="marshal+unique")
    >>> w_hat.sum().backward()
    >>> w.grad.shape
    torch.Size([64, 32])
"""

from __future__ import annotations

import torch

from edkm.cluster.dkm import dkm_autograd
from edkm.memory.fused import fused_dkm
from edkm.memory.hooks import SavedTensorHooks
from edkm.memory.plan import MemoryPlan, parse_memory


def dkm(
    weights: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    iters: int,
    eps: float = 0.0,
    memory: str = "plain",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable k-means of ``weights`` warm-started from ``centroids``.

    Args:
        weights: any shape; with ``centroids`` of shape (G, k) it is split into G equal groups
            in row-major order (one LUT per group of output channels).
        centroids: (k,) or (G, k) starting centroids (treated as constants).
        tau: absolute temperature (same units as w^2), a float or a (G,) tensor.
        iters: number of centroid updates (0 = soft assignment to the given centroids).
        eps: stop early once max|delta c| < eps (0 disables).
        memory: "plain", "marshal", "unique", "shard", "+"-joined combinations, "fused" or "auto"
            (see :mod:`edkm.memory`). Every mode gives the same values and gradients.

    Returns:
        (clustered weights in ``weights.dtype`` and shape, fp32 centroids after the last update).
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if memory == "plain":
        w_hat, c = dkm_autograd(weights, centroids, tau, iters, eps)
    else:
        w_hat, c = dkm_with_memory(weights, centroids, tau=tau, iters=iters, eps=eps, memory=memory)
    return w_hat.to(weights.dtype), c


def dkm_with_memory(
    weights: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    iters: int,
    eps: float = 0.0,
    memory: str | MemoryPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKM (same arguments and results as ``edkm.cluster.dkm.dkm_autograd``) under a memory spec.

    Raises:
        ValueError: unknown spec; "unique"/"fused" on weights that are not exact 16-bit values (on
            every rank alike).
        RuntimeError: "shard" without an initialised process group, or with weights or centroids
            that differ between ranks; ranks that disagree on whether the weights are 16-bit.
    """
    plan, dtype = (memory if isinstance(memory, MemoryPlan) else parse_memory(memory)).decide(weights)
    if plan.fused:
        return fused_dkm(weights, centroids, tau=tau, iters=iters, eps=eps, dtype=dtype)
    if plan.plain:
        return dkm_autograd(weights, centroids, tau, iters, eps)
    with SavedTensorHooks(plan, weights, centroids, dtype=dtype):
        return dkm_autograd(weights, centroids, tau, iters, eps)

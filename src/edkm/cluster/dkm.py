"""Differentiable k-means (DKM) for one weight tensor, as defined in docs/method.md §2.

For weights w_i and k centroids c_j:

    D_ij = (w_i - c_j)^2,   A_i = softmax_j(-D_ij / tau),   c_j <- sum_i A_ij w_i / sum_i A_ij

repeated ``iters`` times (gradients flow through every update), then the clustered weights are
W_hat = A C with A recomputed from the final centroids. All math runs in fp32.

The public entry point with the memory modes is :func:`edkm.dkm` (:mod:`edkm.memory.modes`).

Example:
    >>> import torch
    >>> from edkm.cluster.kmeans import kmeans1d
    >>> w = torch.randn(64, 32, requires_grad=True)
    >>> c = kmeans1d(w.detach(), 8)
    >>> w_hat, c_new = dkm_autograd(w, c, tau=1e-3, iters=3)
    >>> w_hat.sum().backward()
    >>> w.grad.shape
    torch.Size([64, 32])
"""

from __future__ import annotations

import torch
import torch.distributed as dist

TINY = 1e-30  # guards sum_i A_ij against underflow for a centroid far from every weight


def group_view(weights: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View weights as (G, n, 1) and centroids as (G, 1, k) in fp32."""
    if centroids.dim() == 1:
        centroids = centroids.unsqueeze(0)
    if centroids.dim() != 2:
        raise ValueError(f"centroids must have shape (k,) or (groups, k), got {tuple(centroids.shape)}")
    groups = centroids.shape[0]
    if weights.numel() % groups:
        raise ValueError(f"{weights.numel()} weights cannot be split into {groups} equal groups")
    x = weights.float().reshape(groups, -1, 1)
    return x, centroids.float().unsqueeze(1)


def soft_assign(x: torch.Tensor, c: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Attention A = softmax(-(x - c)^2 / tau) over the centroid axis (last)."""
    return torch.softmax(-(x - c).square() / tau, dim=-1)


def centroid_update(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Soft k-means step c_j = sum_i A_ij x_i / sum_i A_ij; an empty centroid keeps its value."""
    mass = a.sum(dim=1, keepdim=True)
    new = (a * x).sum(dim=1, keepdim=True) / mass.clamp_min(TINY)
    return torch.where(mass > TINY, new, c)


def converged(old: torch.Tensor, new: torch.Tensor, eps: float) -> bool:
    """Early-stop test max|delta c| < eps, decided identically on every rank."""
    if eps <= 0:
        return False
    done = (new - old).abs().max().lt(eps).to(torch.float32)  # on the weights' device (NCCL needs it there)
    if dist.is_available() and dist.is_initialized():  # not edkm.ranks: cluster/ imports nothing else of edkm
        dist.all_reduce(done, op=dist.ReduceOp.MIN)  # stop only when every rank agrees
    return bool(done.item())


def dkm_autograd(
    weights: torch.Tensor, centroids: torch.Tensor, tau: float | torch.Tensor, iters: int, eps: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain DKM under autograd: the |W| x |C| maps are saved for backward (the memory wall)."""
    x, c = group_view(weights, centroids)
    tau = group_tau(tau)
    for _ in range(iters):
        new = centroid_update(x, soft_assign(x, c, tau), c)
        stop = converged(c.detach(), new.detach(), eps)
        c = new
        if stop:
            break
    return final_assignment(x, c, tau).reshape(weights.shape), c.squeeze(1).reshape(centroids.shape)


def group_tau(tau: float | torch.Tensor) -> float | torch.Tensor:
    """tau as DKM divides by it: a float, or a (G, 1, 1) fp32 tensor."""
    return torch.as_tensor(tau, dtype=torch.float32).reshape(-1, 1, 1) if torch.is_tensor(tau) else tau


def final_assignment(x: torch.Tensor, c: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """W_hat = A(x, C) C for weights (G, n, 1) and centroids (G, 1, k); tau from :func:`group_tau`.

    The last step of :func:`dkm_autograd`; called again with the same inputs it gives the same bits.
    """
    return (soft_assign(x, c, tau) * c).sum(dim=-1)

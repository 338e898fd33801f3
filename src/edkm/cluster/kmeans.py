"""Fast 1-D k-means and hard assignment.

In one dimension the clusters of sorted values are contiguous ranges, so a Lloyd step needs only
the boundaries (midpoints between centroids), a ``searchsorted`` and prefix sums: O(k log m) per
step on the m distinct values, after one O(|W|) pass to count them (16-bit weights have at most
65,536 distinct values). A LLaMA-7B MLP matrix (45 M weights) takes about a second.

Example:
    >>> import torch, edkm
    >>> w = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 5.2]).to(torch.bfloat16)
    >>> edkm.kmeans1d(w, 2).tolist()
    [[0.10009765625, 5.09375]]
"""

from __future__ import annotations

import torch

from edkm.cluster.sixteen import SIXTEEN_BIT, count16


def _distinct(x: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values (float64, ascending) and counts (float64) of a 1-D tensor; with ``weight`` (one
    non-negative number per element) the counts are the summed weights of each value."""
    if weight is not None:
        values, inverse = torch.unique(x.float(), sorted=True, return_inverse=True)
        counts = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, weight.double())
        return values.double(), counts
    try:
        values, counts = count16(x, x.dtype if x.dtype in SIXTEEN_BIT else None)
    except ValueError:  # not 16-bit: fall back to a sort
        values, counts = torch.unique(x.float(), sorted=True, return_counts=True)
    return values.double(), counts.double()


def _lloyd(u: torch.Tensor, s0: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, c: torch.Tensor, max_iters: int):
    """Weighted Lloyd iterations on sorted distinct values via prefix sums; returns (centroids, SSE)."""
    zero = u.new_zeros(1)
    s0, s1, s2 = (torch.cat([zero, s]) for s in (s0, s1, s2))
    for _ in range(max_iters + 1):
        cuts = torch.searchsorted(u, (c[:-1] + c[1:]) / 2, right=True)
        edges = torch.cat([cuts.new_zeros(1), cuts, cuts.new_tensor([u.numel()])])
        n = s0[edges[1:]] - s0[edges[:-1]]
        total = s1[edges[1:]] - s1[edges[:-1]]
        new = torch.where(n > 0, total / n.clamp_min(1e-300), c)
        new = torch.sort(new).values
        if torch.equal(new, c):
            break
        c = new
    sq = s2[edges[1:]] - s2[edges[:-1]]
    sse = (sq - 2 * c * total + c * c * n).sum()
    return c, sse


def _kmeans1d_single(x: torch.Tensor, k: int, max_iters: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    u, n = _distinct(x.reshape(-1), weight)
    if weight is not None:  # values of zero weight cannot pull a centroid
        u, n = u[n > 0], n[n > 0]
    if u.numel() <= k:  # fewer distinct values than centroids: every value is a centroid
        return torch.cat([u, u[-1:].expand(k - u.numel())]).float()
    s0, s1, s2 = n.cumsum(0), (n * u).cumsum(0), (n * u * u).cumsum(0)
    quantiles = (torch.arange(k, dtype=torch.float64) + 0.5) / k * s0[-1]
    inits = [
        u[torch.searchsorted(s0, quantiles).clamp_max(u.numel() - 1)],  # equal-mass split
        torch.linspace(float(u[0]), float(u[-1]), k, dtype=torch.float64),  # uniform over the range
    ]
    best = min((_lloyd(u, s0, s1, s2, torch.sort(c).values, max_iters) for c in inits), key=lambda r: float(r[1]))
    return best[0].float()


def _kmeans1d_rows(x: torch.Tensor, k: int, max_iters: int) -> torch.Tensor:
    """k-means of each row of ``x`` (B, n), all rows at once: sorted rows, prefix sums, batched Lloyd."""
    x = torch.sort(x.double(), dim=1).values
    b, n = x.shape
    zero = x.new_zeros(b, 1)
    s1, s2 = torch.cat([zero, x.cumsum(1)], 1), torch.cat([zero, (x * x).cumsum(1)], 1)
    quantiles = (torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) / k * n
    pos = torch.searchsorted(torch.arange(1, n + 1, dtype=torch.float64, device=x.device), quantiles).clamp_max(n - 1)
    ramp = torch.arange(k, dtype=torch.float64, device=x.device) / max(k - 1, 1)
    inits = [x[:, pos], x[:, :1] + (x[:, -1:] - x[:, :1]) * ramp]  # equal-mass split; uniform over the range
    best_c, best_sse = None, None
    for c in inits:
        c = torch.sort(c, dim=1).values
        for _ in range(max_iters + 1):
            cuts = torch.searchsorted(x, ((c[:, :-1] + c[:, 1:]) / 2).contiguous(), right=True)
            edges = torch.cat([cuts.new_zeros(b, 1), cuts, cuts.new_full((b, 1), n)], 1)
            cnt = (edges[:, 1:] - edges[:, :-1]).double()
            total = s1.gather(1, edges[:, 1:]) - s1.gather(1, edges[:, :-1])
            new = torch.sort(torch.where(cnt > 0, total / cnt.clamp_min(1e-300), c), dim=1).values
            if torch.equal(new, c):  # every row at its fixed point (a converged row stays put)
                break
            c = new
        sse = (s2.gather(1, edges[:, 1:]) - s2.gather(1, edges[:, :-1]) - 2 * c * total + c * c * cnt).sum(1)
        if best_c is None:
            best_c, best_sse = c, sse
        else:
            better = (sse < best_sse).unsqueeze(1)
            best_c, best_sse = torch.where(better, c, best_c), torch.minimum(sse, best_sse)
    return best_c.float()


def kmeans1d(
    weights: torch.Tensor,
    k: int,
    *,
    groups: int = 1,
    max_iters: int = 300,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """k-means of the scalar values of ``weights``, split into ``groups`` equal row-major groups.

    Returns sorted fp32 centroids of shape (groups, k). The best of two initialisations
    (equal-mass quantiles, uniform over the range) by within-cluster squared error is kept.
    Groups of up to 65,536 weights are solved together (sorted rows, batched Lloyd steps), in
    batches of about 4 M weights; a group with at most k distinct values gets those values.

    ``importance`` (non-negative, broadcastable to ``weights``, e.g. the (1, in) mean squared input of a
    linear layer's columns) weights each value's squared error: activation-aware k-means, which keeps a
    centroid for the few large weights that multiply large activations (the "super weights" of real LLMs)
    where plain k-means of the values clips them.

    >>> import torch, edkm
    >>> w = torch.tensor([[0.0, 0.1, 0.2, 5.0]]).to(torch.bfloat16)
    >>> edkm.kmeans1d(w, 2, importance=torch.tensor([[1.0, 1.0, 1.0, 0.0]])).tolist()  # 5.0 does not count
    [[0.050048828125, 0.2001953125]]
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if weights.numel() == 0 or weights.numel() % groups:
        raise ValueError(f"{weights.numel()} weights cannot be split into {groups} non-empty equal groups")
    rows = weights.detach().cpu().reshape(groups, -1)
    if importance is not None:
        imp = importance.detach().cpu().double().expand(weights.shape).reshape(groups, -1)
        if imp.min() < 0:
            raise ValueError("kmeans1d: importance must be non-negative")
        return torch.stack([_kmeans1d_single(r, k, max_iters, i) for r, i in zip(rows, imp)]).to(weights.device)
    if rows.shape[1] > 1 << 16:  # few large groups: distinct values and counts, one group at a time
        return torch.stack([_kmeans1d_single(row, k, max_iters) for row in rows]).to(weights.device)
    out = torch.empty(groups, k)
    step = max(1, (1 << 22) // rows.shape[1])
    for g0 in range(0, groups, step):
        out[g0 : g0 + step] = _kmeans1d_rows(rows[g0 : g0 + step], k, max_iters)
    sorted_rows = torch.sort(rows.float(), dim=1).values
    few = ((sorted_rows.diff(dim=1) != 0).sum(1) + 1 <= k).nonzero().flatten().tolist()
    for g in few:  # fewer distinct values than centroids: every value is a centroid
        out[g] = _kmeans1d_single(rows[g], k, max_iters)
    return out.to(weights.device)


def hard_assign(weights: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-centroid indices (uint8, shape (G, n)) and the sorted LUT (G, k): index_i = argmin_j (w_i - c_j)^2."""
    lut = torch.sort(centroids.float().reshape(-1, centroids.shape[-1]), dim=-1).values
    x = weights.detach().float().reshape(lut.shape[0], -1)
    mid = ((lut[:, :-1] + lut[:, 1:]) / 2).contiguous()
    idx = torch.searchsorted(mid, x.contiguous())  # ties go to the lower centroid, as argmin does
    return idx.to(torch.uint8 if lut.shape[1] <= 256 else torch.int32), lut


def decode(
    lut: torch.Tensor, indices: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Weights from a (G, k) LUT and (G, n) indices, in ``dtype`` and ``shape``."""
    return torch.gather(lut.to(dtype), 1, indices.reshape(lut.shape[0], -1).long()).reshape(shape)

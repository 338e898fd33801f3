"""Sharded DKM under FSDP: each rank clusters only its own rows of a weight (eDKM's S, docs/method.md §3-§4).

DKM on a weight FSDP has gathered repeats the same work on every rank. Here rank r holds rows
[r*p, (r+1)*p) of the fp32 master weight (p = ceil(rows / N), a ``Shard(0)`` DTensor that FSDP
ignores), and

* forward: counts the 16-bit bit patterns of its rows per LUT group, all-reduces the count tables
  (G x 65,536 numbers), runs the soft k-means updates on the distinct (value, count) pairs (the
  unique domain of :mod:`edkm.memory.fused`: every rank now holds the same tables), computes
  W_hat for its own rows by table lookup, and all-gathers the clustered rows for the matmul
  (:class:`GatherRows`, whose backward reduce-scatters);
* backward: buckets its rows' incoming gradient by value, all-reduces the buckets (G x 65,536),
  rebuilds the small tables and differentiates them: dL/dw_i = g_i F(w_i) + R(w_i) (docs/method.md §4).

Values and gradients equal DKM on the gathered weight to float tolerance (tests: 1e-6 relative).
Only a reference to the local rows, the starting centroids and the pair tables are kept for
backward; transient memory is O(pairs x k x iters) with pairs <= G x 65,536.

Example (one process acts as a group of one)::

    >>> import torch
    >>> from edkm.distributed.sharded import sharded_dkm
    >>> w = torch.randn(8, 16).to(torch.bfloat16).float().requires_grad_()
    >>> w_hat, c = sharded_dkm(w, torch.linspace(-2, 2, 4).unsqueeze(0), tau=torch.tensor([0.05]), iters=2,
    ...                        row_offset=0, group_rows=8, dtype=torch.bfloat16)
    >>> w_hat.shape, c.shape
    (torch.Size([8, 16]), torch.Size([1, 4]))
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from edkm.cluster.dkm import converged
from edkm.ranks import rank_world

PATTERNS = 1 << 16
TINY = 1e-30
CHUNK = 1 << 20  # as edkm.cluster.dkm: guards a centroid's mass against underflow


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if rank_world(group)[1] > 1:
        dist.all_reduce(t, group=group)
    return t


def row_keys(w: torch.Tensor, row_offset: int, group_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """int32 key (group * 65,536 + bit pattern) of every weight of local rows starting at ``row_offset``."""
    pattern = w.detach().to(dtype).view(torch.int16).to(torch.int32).bitwise_and_(PATTERNS - 1)
    group = torch.div(
        torch.arange(row_offset, row_offset + w.shape[0], device=w.device, dtype=torch.int32),
        group_rows,
        rounding_mode="floor",
    )
    return pattern.add_((group * PATTERNS).unsqueeze(1))


def _row_chunks(w: torch.Tensor, row_offset: int, group_rows: int, dtype: torch.dtype):
    """(r0, r1, flat int32 keys) over chunks of about 2^20 weights (bounds the key buffers)."""
    step = max(1, CHUNK // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], step):
        r1 = min(r0 + step, w.shape[0])
        yield r0, r1, row_keys(w[r0:r1], row_offset + r0, group_rows, dtype).reshape(-1)


def _assign(u: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    return torch.softmax(-(u.unsqueeze(1) - c).square() / tau.unsqueeze(1), dim=-1)


def _update(u, n, gid, c, tau):
    """One soft k-means update on (value, count) pairs; returns (new centroids, mass), fp64 sums."""
    na = _assign(u, c[gid], tau[gid]).double() * n.unsqueeze(1)
    mass = torch.zeros(c.shape, dtype=torch.float64, device=c.device).index_add_(0, gid, na)
    moment = torch.zeros_like(mass).index_add_(0, gid, na * u.double().unsqueeze(1))
    return torch.where(mass.float() > TINY, (moment / mass.clamp_min(TINY)).float(), c), mass


class _ShardedDKM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, centroids, tau, iters, eps, row_offset, group_rows, dtype, group):  # type: ignore[override]
        groups, k = centroids.shape
        w2 = w.detach()  # (rows, cols), checked by sharded_dkm
        counts = torch.zeros(groups * PATTERNS, dtype=torch.float64, device=w.device)
        for _, _, key in _row_chunks(w2, row_offset, group_rows, dtype):
            counts.index_add_(0, key, torch.ones(1, dtype=torch.float64, device=w.device).expand(key.numel()))
        counts = _all_reduce(counts, group)
        present = counts.nonzero().squeeze(1)  # only patterns present anywhere: no NaN/Inf from absent ones
        n, gid = counts[present], torch.div(present, PATTERNS, rounding_mode="floor")
        u = (present & (PATTERNS - 1)).to(torch.int16).view(dtype).float()
        c, steps = centroids.detach().float().clone(), 0
        with torch.no_grad():
            for _ in range(iters):
                new, _ = _update(u, n, gid, c, tau)
                stop = converged(c, new, eps)
                c, steps = new, steps + 1
                if stop:
                    break
            table = torch.zeros(groups * PATTERNS, dtype=torch.float32, device=w.device)
            table[present] = (_assign(u, c[gid], tau[gid]) * c[gid]).sum(-1)
            out = torch.empty(w2.shape, dtype=torch.float32, device=w.device)
            for r0, r1, key in _row_chunks(w2, row_offset, group_rows, dtype):
                torch.index_select(table, 0, key, out=out[r0:r1].view(-1))
        ctx.save_for_backward(w, centroids.detach().float().clone(), tau, present, n)
        ctx.args = (steps, row_offset, group_rows, dtype, group)
        return out.reshape(w.shape), c

    @staticmethod
    def backward(ctx, grad_w, _grad_c):  # type: ignore[override]
        w, c0, tau, present, n = ctx.saved_tensors
        steps, row_offset, group_rows, dtype, group = ctx.args
        if grad_w is None:
            return (None,) * 9
        groups, k = c0.shape
        w2, g2 = w.detach(), grad_w
        buckets = torch.zeros(groups * PATTERNS, dtype=torch.float64, device=w.device)
        for r0, r1, key in _row_chunks(w2, row_offset, group_rows, dtype):
            buckets.index_add_(0, key, g2[r0:r1].reshape(-1).double())
        bucket = _all_reduce(buckets, group)[present]  # G_u summed over every rank's rows
        gid = torch.div(present, PATTERNS, rounding_mode="floor")
        u = (present & (PATTERNS - 1)).to(torch.int16).view(dtype).float()
        with torch.enable_grad():  # R: the paths through the centroid updates, on the pair tables
            y = u.clone().requires_grad_(steps > 0)
            c = c0
            for _ in range(steps):
                c, _ = _update(y, n, gid, c, tau)
            cr = c[gid]
            final = (_assign(u, cr, tau[gid]) * cr).sum(-1)
            r = torch.autograd.grad((final.double() * bucket).sum(), y)[0] / n.float() if steps else torch.zeros_like(u)
        with torch.no_grad():  # F: derivative of the final assignment at fixed centroids (closed form)
            cr, t = c.detach()[gid], tau[gid].unsqueeze(1)
            a = _assign(u, cr, tau[gid])
            dz = a * (cr - (a * cr).sum(-1, keepdim=True))
            f = -(dz * 2 * (u.unsqueeze(1) - cr) / t).sum(-1)
            f_table = torch.zeros(groups * PATTERNS, dtype=torch.float32, device=w.device)
            r_table = torch.zeros_like(f_table)
            f_table[present], r_table[present] = f, r.float()
            grad = torch.empty(w2.shape, dtype=w.dtype, device=w.device)
            for r0, r1, key in _row_chunks(w2, row_offset, group_rows, dtype):
                rows = torch.index_select(r_table, 0, key).addcmul_(
                    torch.index_select(f_table, 0, key), g2[r0:r1].reshape(-1).float()
                )
                grad[r0:r1] = rows.view(r1 - r0, -1)
            grad = grad.reshape(w.shape)
        return grad, None, None, None, None, None, None, None, None


def sharded_dkm(
    w: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: torch.Tensor,
    iters: int,
    row_offset: int,
    group_rows: int,
    dtype: torch.dtype = torch.bfloat16,
    eps: float = 0.0,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKM of this rank's rows of a weight whose other rows the other ranks of ``group`` hold.

    Args:
        w: (rows_local, cols) exact ``dtype`` values (e.g. fp32 after a straight-through 16-bit cast);
            its gradient comes back in ``w.dtype``.
        centroids: (G, k) starting centroids, identical on every rank (treated as constants).
        tau: (G,) absolute temperatures.
        iters: centroid updates; ``eps``: early stop on max|delta c| < eps (decided on every rank).
        row_offset: global index of the first local row; group_rows: rows per LUT group.

    Returns:
        (W_hat of the local rows in fp32, final centroids (G, k)), equal on every rank.
        Every rank of ``group`` must call it for the same weight in the same order (collectives).
    """
    if centroids.dim() != 2:
        raise ValueError(f"centroids must have shape (groups, k), got {tuple(centroids.shape)}")
    if w.dim() != 2:
        raise ValueError(f"w must be the (rows, cols) local rows of a weight, got {tuple(w.shape)}")
    return _ShardedDKM.apply(
        w,
        centroids,
        tau.float().reshape(-1).to(w.device),
        int(iters),
        float(eps),
        int(row_offset),
        int(group_rows),
        dtype,
        group,
    )


class GatherRows(torch.autograd.Function):
    """All-gather each rank's rows (p = ceil(rows / N) each, the last ones shorter) into the full tensor.

    Backward reduce-scatters the full gradient and divides it by N: the same average FSDP applies to
    the gradients of the parameters it manages, so both kinds combine into one correct update.
    """

    @staticmethod
    def forward(ctx, local, rows, group):  # type: ignore[override]
        ctx.args = (local.shape[0], group)
        return gather_rows(local, rows, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        local_rows, group = ctx.args
        return scatter_rows(grad, local_rows, group), None, None


class GatheredLinear(torch.autograd.Function):
    """``x @ W^T + b`` where W is gathered from every rank's ``local`` rows, keeping only ``local`` for
    backward (gathered again there), as FSDP reshards the weights it manages after forward.

    Backward: the input gradient with the re-gathered W; W's gradient reduce-scattered and divided
    by N (:class:`GatherRows`' convention), so only this rank's rows come back.
    """

    @staticmethod
    def forward(ctx, x, local, bias, rows, group):  # type: ignore[override]
        full = gather_rows(local, rows, group)
        need_x, need_w = ctx.needs_input_grad[:2]  # what each gradient needs, as F.linear keeps it
        ctx.save_for_backward(x if need_w else None, local if need_x else None)
        ctx.args = (rows, local.shape[0], group, bias is not None)
        return torch.nn.functional.linear(x, full, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, local = ctx.saved_tensors
        rows, mine, group, has_bias = ctx.args
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = (g2 @ gather_rows(local, rows, group)).view(*grad.shape[:-1], -1) if ctx.needs_input_grad[0] else None
        grad_local = scatter_rows(g2.t() @ x.reshape(-1, x.shape[-1]), mine, group) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_local, grad_b, None, None


def scatter_rows(full_grad: torch.Tensor, local_rows: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Reduce-scatter a (rows, ...) gradient to each rank's rows, divided by N (the mean, as FSDP takes it)."""
    n = dist.get_world_size(group)
    p = -(-full_grad.shape[0] // n)
    padded = full_grad.new_zeros((n * p, *full_grad.shape[1:]))
    padded[: full_grad.shape[0]] = full_grad
    out = full_grad.new_empty((p, *full_grad.shape[1:]))
    dist.reduce_scatter_single(out, padded, group=group)
    return out[:local_rows] / n


def gather_rows(local: torch.Tensor, rows: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather each rank's rows (ceil(rows / N) each, the last ones shorter) into the (rows, ...) tensor
    (no autograd)."""
    n = dist.get_world_size(group)
    p = -(-rows // n)
    padded = local.new_zeros((p, *local.shape[1:]))
    padded[: local.shape[0]] = local
    full = local.new_empty((n * p, *local.shape[1:]))
    dist.all_gather_single(full, padded.contiguous(), group=group)
    return full[:rows]


def local_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's rows under ``Shard(0)`` (torch.chunk sizes: ceil(rows / world), last ones shorter).

    >>> [local_rows(5, r, 4) for r in range(4)]
    [(0, 2), (2, 4), (4, 5), (5, 5)]
    """
    p = -(-rows // world)
    start = min(rank * p, rows)
    return start, min(start + p, rows)

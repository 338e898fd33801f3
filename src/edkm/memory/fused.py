"""Unique-domain DKM (docs/method.md §4): the whole DKM computed on the distinct 16-bit values of each group.

Every DKM quantity is a sum over weights of a function of one weight's value, so with the
distinct values u of a group and their counts n_u (at most 65,536 for 16-bit weights),
``sum_i f(w_i) = sum_u n_u f(u)``. A weight's own bit pattern is its index: a 65,536-entry
lookup per group maps patterns to the values actually present (absent patterns, NaN/Inf among
them, never enter a computation), so no index list and no |W| x |C| map ever exist. (Groups
smaller than 8,192 weights, e.g. per-channel LUTs, find their present patterns with a sort
instead, so the lookups never outgrow the weights.)

Forward: count the patterns (one O(|W|) pass), run the ``iters`` soft k-means updates on the
(value, count) pairs, build the table W_hat(u) = A(u, C) C and gather it back to the weights.
Saved for backward: the weights tensor itself (a reference, not a copy), the centroids and the
per-centroid masses of every iteration (O(iters x G x k)), tau, and the pair domain (present keys
and counts, 12 bytes per pair) when it is small beside the weights (else backward recounts it).
With ``dtype`` given the weights may be fp32 master weights: they are rounded to ``dtype`` on the
fly, chunk by chunk, the gradient passing straight through (no rounded copy exists).

Backward (closed form of the two-leaf-copy construction of docs/method.md §4, x in the final assignment, y in
the updates): bucket the incoming gradient by value, G_u = sum_{i: w_i = u} g_i, then sweep the
iterations in reverse on the pairs, giving F(u) = dW_hat(u)/du at fixed centroids and R(u), the
per-weight gradient through all centroid updates; finally dL/dw_i = g_i F(w_i) + R(w_i) (two
gathers). Tables are processed in row chunks, so transient memory stays O(chunk x k) plus
O(65,536) per group (more precisely O(number of distinct (group, value) pairs)).

Values, gradients and the returned centroids equal :func:`edkm.cluster.dkm.dkm_autograd` to
float tolerance (sums here are accumulated in fp64, elementwise tables in fp32).

Example:
    >>> import torch
    >>> from edkm.memory.fused import fused_dkm
    >>> w = torch.randn(64, 32).to(torch.bfloat16).requires_grad_()
    >>> c = torch.linspace(-2, 2, 8)
    >>> w_hat, c_new = fused_dkm(w, c, tau=1e-2, iters=3)
    >>> w_hat.dtype, w_hat.shape, c_new.shape
    (torch.float32, torch.Size([64, 32]), torch.Size([8]))
    >>> w_hat.sum().backward()
    >>> w.grad.dtype
    torch.bfloat16
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from edkm.cluster.dkm import TINY, converged
from edkm.cluster.sixteen import SIXTEEN_BIT, sixteen_bit_dtype
from edkm.memory.domain import Domain

__all__ = ["fused_dkm", "fused_recompute", "run_updates", "final_table", "backward_tables"]

KEEP_FRACTION = 16  # save the pair domain for backward when it is <= 1/16 of the weights' bytes


def _assign(u: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """A = softmax(-(u - c)^2 / tau) over the centroid axis, as :func:`edkm.cluster.dkm.soft_assign`."""
    return torch.softmax(-(u - c).square() / tau, dim=-1)


def update_sums(dom: Domain, c: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masses sum_u n_u A_uj and moments sum_u n_u A_uj u, (G, k) fp64."""
    mass = torch.zeros(c.shape, dtype=torch.float64, device=c.device)
    moment = torch.zeros_like(mass)
    for r0, r1, g in dom.chunks(c.shape[1]):
        u, cr, t = dom.rows(r0, r1, g, c, tau)
        na = _assign(u, cr, t).to(torch.float64) * dom.n[r0:r1].unsqueeze(1)
        gid = dom.gid[r0:r1]
        dom.add(mass, na, g, gid)
        dom.add(moment, na * u.to(torch.float64), g, gid)
    return mass, moment


def final_table(dom: Domain, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """W_hat(u) = sum_j A(u, c)_j c_j per pair, fp32."""
    out = torch.empty(dom.size, dtype=torch.float32, device=c.device)
    for r0, r1, g in dom.chunks(c.shape[1]):
        u, cr, t = dom.rows(r0, r1, g, c, tau)
        out[r0:r1] = (_assign(u, cr, t) * cr).sum(dim=-1)
    return out


def final_backward(dom: Domain, c: torch.Tensor, tau: torch.Tensor, need_f: bool):
    """F(u) = dW_hat(u)/du at fixed c (per pair), and dL/dc = sum_u G_u dW_hat(u)/dc (G, k) fp64."""
    grad_c = torch.zeros(c.shape, dtype=torch.float64, device=c.device)
    f = torch.empty(dom.size, dtype=torch.float32, device=c.device) if need_f else None
    for r0, r1, g in dom.chunks(c.shape[1]):
        u, cr, t = dom.rows(r0, r1, g, c, tau)
        a = _assign(u, cr, t)
        d = 2 * (u - cr) / t  # dz/dc; dz/du = -d with z = -(u - c)^2 / tau
        dz = a * (cr - (a * cr).sum(dim=-1, keepdim=True))  # dW_hat/dz
        if f is not None:
            f[r0:r1] = -(dz * d).sum(dim=-1)
        dom.add(grad_c, (a + dz * d) * dom.gsum[r0:r1].unsqueeze(1).float(), g, dom.gid[r0:r1])
    return f, grad_c


def step_backward(dom: Domain, c, c_next, mass, tau, grad_next, r_acc):
    """Reverse one centroid update c -> c_next; adds each pair's per-weight gradient into r_acc."""
    kept = mass.float() > TINY
    gs = torch.where(kept, grad_next / mass.clamp_min(TINY), 0.0).float()  # dL/d(moment_j)
    grad_c = torch.where(kept, 0.0, grad_next)  # an empty centroid passes its gradient straight through
    for r0, r1, g in dom.chunks(c.shape[1]):
        u, cr, t = dom.rows(r0, r1, g, c, tau)
        gid = dom.gid[r0:r1]
        gsr = gs[g].unsqueeze(0) if g is not None else gs[gid]
        cn = c_next[g].unsqueeze(0) if g is not None else c_next[gid]
        a = _assign(u, cr, t)
        d = 2 * (u - cr) / t
        ab = a * (gsr * (u - cn))  # A_uj dL/dA_uj per unit count (dL/dmass_j = -gs_j c_next_j folded in)
        dz = ab - a * ab.sum(dim=-1, keepdim=True)  # dL/dz per unit count
        if r_acc is not None:
            r_acc[r0:r1] += (a * gsr).sum(dim=-1) - (dz * d).sum(dim=-1)
        dom.add(grad_c, dz * d * dom.n[r0:r1].unsqueeze(1).float(), g, gid)
    return grad_c


def run_updates(dom: Domain, c: torch.Tensor, tau: torch.Tensor, iters: int, eps: float):
    """The ``iters`` soft k-means updates from centroids ``c`` (G, k): ([c_0, ..., c_T], [mass_1, ..., mass_T])."""
    cs, masses = [c], []
    for _ in range(iters):
        mass, moment = update_sums(dom, c, tau)
        new = torch.where(mass.float() > TINY, (moment / mass.clamp_min(TINY)).float(), c)
        stop = converged(c, new, eps)
        cs.append(new)
        masses.append(mass)
        c = new
        if stop:
            break
    return cs, masses


def backward_tables(
    dom: Domain,
    cs: torch.Tensor,
    masses: torch.Tensor,
    tau: torch.Tensor,
    gc: torch.Tensor,
    has_grad: bool,
    need_w: bool,
):
    """Per-pair tables (F, R) and dL/dc_0 (G, k) from the bucketed gradient ``dom.gsum`` (set when ``has_grad``)
    and ``gc``, the gradient arriving at the final centroids: dL/dw_i = g_i F(w_i) + R(w_i)."""
    f = None
    if has_grad:
        f, gc_final = final_backward(dom, cs[-1], tau, need_w)
        gc = gc + gc_final
    r = torch.zeros(dom.size, dtype=torch.float32, device=cs.device) if need_w else None
    for t in reversed(range(masses.shape[0])):
        gc = step_backward(dom, cs[t], cs[t + 1], masses[t], tau, gc, r)
    return f, r, gc


class _FusedDKM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, centroids, tau, iters, eps, dtype, out_dtype, tables):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        k = centroids.shape[-1]
        c = centroids.detach().float().reshape(-1, k)
        w2 = weights.detach().reshape(c.shape[0], -1)
        dom = Domain(w2, dtype)
        cs, masses = run_updates(dom, c, tau, iters, eps)
        c = cs[-1]
        table = final_table(dom, c, tau)
        out = torch.empty(w2.shape, dtype=out_dtype, device=weights.device)
        dom.scatter_pairs([table], None, out)
        mass_stack = torch.stack(masses) if masses else c.new_zeros((0, *c.shape), dtype=torch.float64)
        cs = torch.stack(cs)
        keep = dom.nbytes() * KEEP_FRACTION <= weights.numel() * weights.element_size()
        keys, counts = dom.saved() if keep else (None, None)
        ctx.save_for_backward(weights, cs, mass_stack, tau, keys, counts)
        if tables is not None:  # what recomputes W_hat later (fused_recompute)
            tables.extend([keys, table] if keep else [c, tau])
        ctx.dtype = dtype
        ctx.centroids_meta = (centroids.shape, centroids.dtype)
        return out.reshape(weights.shape), c.clone().reshape(centroids.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_w, grad_c):  # type: ignore[override]
        weights, cs, masses, tau, keys, counts = ctx.saved_tensors
        groups, k = cs.shape[1:]
        need_w, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w2 = weights.detach().reshape(groups, -1)
        g2 = grad_w.reshape(groups, -1) if grad_w is not None else None
        dom = Domain(w2, ctx.dtype, saved=(keys, counts) if keys is not None else None)
        if g2 is not None:
            dom.bucket(g2)
        gc = torch.zeros((groups, k), dtype=torch.float64, device=cs.device)
        if grad_c is not None:
            gc += grad_c.reshape(groups, k)
        f, r, gc = backward_tables(dom, cs, masses, tau, gc, g2 is not None, need_w)
        grad_weights = grad_centroids = None
        if need_w:
            out = torch.empty(w2.shape, dtype=weights.dtype, device=weights.device)
            dom.scatter_pairs([r, f] if f is not None else [r], g2 if f is not None else None, out)
            grad_weights = out.reshape(weights.shape)
        if need_c:
            shape, dtype = ctx.centroids_meta
            grad_centroids = gc.to(dtype).reshape(shape)
        return grad_weights, grad_centroids, None, None, None, None, None, None


def fused_dkm(
    weights: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    iters: int,
    eps: float = 0.0,
    out_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    tables: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKM computed in the unique domain; same contract as :func:`edkm.cluster.dkm.dkm_autograd`.

    Args:
        weights: any shape. Without ``dtype``: exact 16-bit values, a bf16/fp16 tensor or fp32
            holding such values (otherwise ValueError). Its gradient comes back in ``weights.dtype``.
        centroids: (k,) or (G, k) starting centroids; with (G, k) the weights are split into G equal
            row-major groups, one LUT each. They get a gradient too if they require one.
        tau: absolute temperature (units of w^2), a float or a (G,) tensor (not differentiated).
        iters: number of centroid updates (0 = soft assignment to the given centroids).
        eps: stop early once max|delta c| < eps (0 disables); decided on every rank together
            (all-reduce under torch.distributed), like :func:`edkm.cluster.dkm.converged`.
        out_dtype: dtype of the returned clustered weights; default fp32 like ``dkm_autograd``.
            Passing ``weights.dtype`` gives what the caller's cast would, without the fp32 copy.
        dtype: the 16-bit type to cluster in. Given, ``weights`` (e.g. fp32 master weights) are
            rounded to it on the fly with the gradient passed straight through, and not checked.
        tables: a list to receive the tensors :func:`fused_recompute` needs to rebuild W_hat.

    Returns:
        (W_hat with ``weights``' shape, final fp32 centroids with ``centroids``' shape).

    Memory: saves for backward a reference to ``weights`` plus O(iters x G x k) numbers and at most
    12 bytes per distinct (group, value) pair; transient tables are O(pairs) + O(chunk x k),
    pairs <= min(|W|, G x 65,536).
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if centroids.dim() not in (1, 2) or centroids.shape[-1] < 1:
        raise ValueError(f"centroids must have shape (k,) or (groups, k), got {tuple(centroids.shape)}")
    groups = 1 if centroids.dim() == 1 else centroids.shape[0]
    if groups < 1 or weights.numel() % groups:
        raise ValueError(f"{weights.numel()} weights cannot be split into {groups} equal groups")
    if dtype is None:
        dtype = sixteen_bit_dtype(weights)
    elif dtype not in SIXTEEN_BIT or not weights.is_floating_point():
        raise ValueError(f"fused DKM clusters floating-point weights in bf16 or fp16, got {weights.dtype} -> {dtype}")
    tau_t = torch.as_tensor(tau.detach() if torch.is_tensor(tau) else tau, dtype=torch.float32)
    tau_t = tau_t.to(weights.device).reshape(-1)
    if tau_t.numel() == 1:
        tau_t = tau_t.expand(groups).contiguous()
    elif tau_t.numel() != groups:
        raise ValueError(f"tau must be a float or have one value per group ({groups}), got {tau_t.numel()}")
    if centroids.device != weights.device:
        raise ValueError(f"centroids on {centroids.device} but weights on {weights.device}")
    return _FusedDKM.apply(weights, centroids, tau_t, int(iters), float(eps), dtype, out_dtype or torch.float32, tables)


@torch.no_grad()
def fused_recompute(
    weights: torch.Tensor, *tables: torch.Tensor, groups: int, dtype: torch.dtype, out_dtype: torch.dtype
) -> torch.Tensor:
    """W_hat of a :func:`fused_dkm` call again, from the ``tables`` it filled: a gather, O(|W|) time.

    ``tables`` is (present keys, W_hat per pair) when the call kept its pair domain, else
    (final centroids, tau) and the domain is recounted (one more pass over the weights).
    """
    w2 = weights.detach().reshape(groups, -1)
    first, second = tables
    if first.dtype == torch.int64:
        dom = Domain(w2, dtype, saved=(first, torch.ones_like(first, dtype=torch.int32)))
        table = second
    else:
        dom = Domain(w2, dtype)
        table = final_table(dom, first, second)
    out = torch.empty(w2.shape, dtype=out_dtype, device=weights.device)
    dom.scatter_pairs([table], None, out)
    return out.reshape(weights.shape)

"""Unique-domain DKM (SPEC §4): the whole DKM computed on the distinct 16-bit values of each group.

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
per-centroid masses of every iteration (O(iters x G x k)) and tau.

Backward (closed form of the SPEC's two-leaf-copy construction, x in the final assignment, y in
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

import bisect

import torch
from torch.autograd.function import once_differentiable

from ..cluster.dkm import _TINY, converged
from ..cluster.sixteen import sixteen_bit_dtype

__all__ = ["fused_dkm"]

_PATTERNS = 1 << 16  # bit patterns of a 16-bit value
_ELEMS = 1 << 20  # weights per chunk in the passes over the weights (bounds the key buffers)
_TABLE = 1 << 20  # entries per (pairs x k) table chunk (bounds the transient tables)


def _patterns(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bit patterns in [0, 65536) as int32: the values of :func:`edkm.cluster.sixteen.bit_patterns`.

    int32 keys make ``bincount`` and ``index_select`` several times faster than int64 on CPU.
    """
    return w.detach().to(dtype).view(torch.int16).to(torch.int32).bitwise_and_(_PATTERNS - 1)


class _Domain:
    """The distinct (group, value) pairs of a (G, N) tensor of 16-bit values.

    Groups are visited in batches; in a batch a weight's key is ``local group * 65,536 + bit
    pattern``. Large groups (N >= 8,192) use a dense 65,536-entry table per group indexed by the
    key itself (one O(N) counting pass, no sort); small groups (many per-channel LUTs) would make
    those tables cost more than the weights, so their batches find the present keys with a sort
    (``torch.unique``) and map a key to its pair with ``searchsorted``. Pairs are ordered by group,
    then bit pattern. Attributes (U = number of pairs): ``u`` (U,) fp32 values, ``n`` (U,) fp64
    counts, ``gid`` (U,) int64 group of each pair, ``gsum`` (U,) fp64 bucketed gradient (only
    when a gradient is given).
    """

    def __init__(self, w2: torch.Tensor, dtype: torch.dtype, grad2: torch.Tensor | None = None):
        self.w2, self.dtype = w2, dtype
        self.groups, self.cols = w2.shape
        device = w2.device
        self.dense = self.cols * 8 >= _PATTERNS
        if self.dense:
            self.batch = max(1, min(self.groups, _ELEMS // _PATTERNS))
            self.step = max(1, _ELEMS // self.batch)
        else:
            self.batch = max(1, min(self.groups, _ELEMS // max(self.cols, 1)))
            self.step = max(self.cols, 1)
        self.present: list[tuple[int, int, torch.Tensor, int]] = []  # (g0, g1, sorted present keys, pair offset)
        us, ns, gids, gsums, offset = [], [], [], [], 0
        ones = torch.ones(1, dtype=torch.int64, device=device)
        for g0 in range(0, self.groups, self.batch):
            g1 = min(g0 + self.batch, self.groups)
            gsum = None
            if self.dense:
                size = (g1 - g0) * _PATTERNS
                counts = torch.zeros(size, dtype=torch.int64, device=device)
                gsum = torch.zeros(size, dtype=torch.float64, device=device) if grad2 is not None else None
                for a, key in self._keys(g0, g1):  # index_add_ with int32 keys: faster than bincount on CPU
                    counts.index_add_(0, key, ones.expand(key.numel()))
                    if gsum is not None:
                        gsum.index_add_(0, key, grad2[g0:g1, a : a + self.step].reshape(-1).to(torch.float64))
                present = counts.nonzero().squeeze(1)
                counts = counts[present]
                if gsum is not None:
                    gsum = gsum[present]
            else:
                ((_, key),) = self._keys(g0, g1)
                present, inverse, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
                if grad2 is not None:
                    gsum = torch.zeros(present.numel(), dtype=torch.float64, device=device)
                    gsum.index_add_(0, inverse, grad2[g0:g1].reshape(-1).to(torch.float64))
                present = present.to(torch.int64)
            # only patterns actually present become values: absent NaN/Inf patterns never enter a sum
            us.append((present & (_PATTERNS - 1)).to(torch.int16).view(dtype).float())
            ns.append(counts.to(torch.float64))
            gids.append(g0 + torch.div(present, _PATTERNS, rounding_mode="floor"))
            if gsum is not None:
                gsums.append(gsum)
            self.present.append((g0, g1, present, offset))
            offset += present.numel()
        self.u, self.n, self.gid = torch.cat(us), torch.cat(ns), torch.cat(gids)
        self.gsum = torch.cat(gsums) if grad2 is not None else None
        self.size = self.u.numel()
        # group boundaries in pair order (one host sync), used to sum single-group chunks without a scatter
        self.starts = [0, *torch.bincount(self.gid, minlength=self.groups).cumsum(0).tolist()]

    def _keys(self, g0: int, g1: int):
        """(column offset, keys) for column chunks of the groups g0:g1 (int32 dense, int64 sparse)."""
        rows = self.w2[g0:g1]
        itype = torch.int32 if self.dense else torch.int64
        base = None
        if g1 - g0 > 1:
            base = (torch.arange(g1 - g0, device=rows.device, dtype=itype) * _PATTERNS).unsqueeze(1)
        for a in range(0, max(self.cols, 1), self.step):
            key = _patterns(rows[:, a : a + self.step], self.dtype).to(itype)
            if base is not None:
                key = key + base
            yield a, key.reshape(-1)

    def chunks(self, k: int):
        """Row ranges (r0, r1, group or None when the range spans several groups)."""
        rows = max(1, _TABLE // k)
        for r0 in range(0, self.size, rows):
            r1 = min(r0 + rows, self.size)
            g_first = bisect.bisect_right(self.starts, r0) - 1
            g_last = bisect.bisect_right(self.starts, r1 - 1) - 1
            yield r0, r1, (g_first if g_first == g_last else None)

    def rows(self, r0: int, r1: int, g: int | None, c: torch.Tensor, tau: torch.Tensor):
        """Values (R, 1), centroids (R or 1, k) and tau (R or 1, 1) of a row range."""
        u = self.u[r0:r1].unsqueeze(1)
        if g is not None:
            return u, c[g].unsqueeze(0), tau[g].reshape(1, 1)
        gid = self.gid[r0:r1]
        return u, c[gid], tau[gid].unsqueeze(1)

    @staticmethod
    def add(acc: torch.Tensor, rows: torch.Tensor, g: int | None, gid: torch.Tensor) -> None:
        """acc[gid_r] += rows[r] (fp64 accumulation)."""
        rows = rows.to(torch.float64)
        if g is not None:
            acc[g] += rows.sum(0)
        else:
            acc.index_add_(0, gid, rows)

    def scatter_pairs(self, tables: list[torch.Tensor], other: torch.Tensor | None, out: torch.Tensor) -> None:
        """out[g, i] = tables[0](w_gi) (+ other[g, i] * tables[1](w_gi)): per-pair tables gathered to the weights."""
        direct = other is None and out.is_contiguous()
        flat = out.view(-1) if direct else None
        dtype = out.dtype if direct else torch.float32
        for g0, g1, present, offset in self.present:
            pairs = [t[offset : offset + present.numel()].to(dtype) for t in tables]
            if self.dense:  # 65,536 entries per group indexed by key; absent patterns stay 0, never read
                full = []
                for t in pairs:
                    f = torch.zeros((g1 - g0) * _PATTERNS, dtype=dtype, device=out.device)
                    f[present] = t
                    full.append(f)
                pairs = full
            for a, key in self._keys(g0, g1):
                idx = key if self.dense else torch.searchsorted(present, key)
                if direct and (g1 - g0 == 1 or a == 0 and self.step >= self.cols):  # contiguous span
                    start = g0 * self.cols + a
                    torch.index_select(pairs[0], 0, idx, out=flat[start : start + idx.numel()])
                    continue
                val = torch.index_select(pairs[0], 0, idx)
                if other is not None:
                    g = other[g0:g1, a : a + self.step].reshape(-1)
                    val = val.addcmul_(torch.index_select(pairs[1], 0, idx), g.float())
                out[g0:g1, a : a + self.step] = val.view(g1 - g0, -1)


def _assign(u: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """A = softmax(-(u - c)^2 / tau) over the centroid axis, as :func:`edkm.cluster.dkm.soft_assign`."""
    return torch.softmax(-(u - c).square() / tau, dim=-1)


def _update_sums(dom: _Domain, c: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def _final_table(dom: _Domain, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """W_hat(u) = sum_j A(u, c)_j c_j per pair, fp32."""
    out = torch.empty(dom.size, dtype=torch.float32, device=c.device)
    for r0, r1, g in dom.chunks(c.shape[1]):
        u, cr, t = dom.rows(r0, r1, g, c, tau)
        out[r0:r1] = (_assign(u, cr, t) * cr).sum(dim=-1)
    return out


def _final_backward(dom: _Domain, c: torch.Tensor, tau: torch.Tensor, need_f: bool):
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


def _step_backward(dom: _Domain, c, c_next, mass, tau, grad_next, r_acc):
    """Reverse one centroid update c -> c_next; adds each pair's per-weight gradient into r_acc."""
    kept = mass.float() > _TINY
    gs = torch.where(kept, grad_next / mass.clamp_min(_TINY), 0.0).float()  # dL/d(moment_j)
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


class _FusedDKM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, centroids, tau, iters, eps, dtype, out_dtype):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        k = centroids.shape[-1]
        c = centroids.detach().float().reshape(-1, k)
        w2 = weights.detach().reshape(c.shape[0], -1)
        dom = _Domain(w2, dtype)
        cs, masses = [c], []
        for _ in range(iters):
            mass, moment = _update_sums(dom, c, tau)
            new = torch.where(mass.float() > _TINY, (moment / mass.clamp_min(_TINY)).float(), c)
            stop = converged(c, new, eps)
            cs.append(new)
            masses.append(mass)
            c = new
            if stop:
                break
        table = _final_table(dom, c, tau)
        out = torch.empty(w2.shape, dtype=out_dtype, device=weights.device)
        dom.scatter_pairs([table], None, out)
        mass_stack = torch.stack(masses) if masses else c.new_zeros((0, *c.shape), dtype=torch.float64)
        ctx.save_for_backward(weights, torch.stack(cs), mass_stack, tau)
        ctx.dtype = dtype
        ctx.centroids_meta = (centroids.shape, centroids.dtype)
        return out.reshape(weights.shape), c.clone().reshape(centroids.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_w, grad_c):  # type: ignore[override]
        weights, cs, masses, tau = ctx.saved_tensors
        groups, k = cs.shape[1:]
        need_w, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w2 = weights.detach().reshape(groups, -1)
        g2 = grad_w.reshape(groups, -1) if grad_w is not None else None
        dom = _Domain(w2, ctx.dtype, g2)
        gc = torch.zeros((groups, k), dtype=torch.float64, device=cs.device)
        if grad_c is not None:
            gc += grad_c.reshape(groups, k)
        f = None
        if g2 is not None:
            f, gc_final = _final_backward(dom, cs[-1], tau, need_w)
            gc += gc_final
        r = torch.zeros(dom.size, dtype=torch.float32, device=cs.device) if need_w else None
        for t in reversed(range(masses.shape[0])):
            gc = _step_backward(dom, cs[t], cs[t + 1], masses[t], tau, gc, r)
        grad_weights = grad_centroids = None
        if need_w:
            out = torch.empty(w2.shape, dtype=weights.dtype, device=weights.device)
            dom.scatter_pairs([r, f] if f is not None else [r], g2 if f is not None else None, out)
            grad_weights = out.reshape(weights.shape)
        if need_c:
            shape, dtype = ctx.centroids_meta
            grad_centroids = gc.to(dtype).reshape(shape)
        return grad_weights, grad_centroids, None, None, None, None, None


def fused_dkm(
    weights: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    iters: int,
    eps: float = 0.0,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKM computed in the unique domain; same contract as :func:`edkm.cluster.dkm.dkm_autograd`.

    Args:
        weights: any shape, exact 16-bit values: a bf16/fp16 tensor, or fp32 holding such values
            (otherwise ValueError). Its gradient comes back in ``weights.dtype``.
        centroids: (k,) or (G, k) starting centroids; with (G, k) the weights are split into G equal
            row-major groups, one LUT each. They get a gradient too if they require one.
        tau: absolute temperature (units of w^2), a float or a (G,) tensor (not differentiated).
        iters: number of centroid updates (0 = soft assignment to the given centroids).
        eps: stop early once max|delta c| < eps (0 disables); decided on every rank together
            (all-reduce under torch.distributed), like :func:`edkm.cluster.dkm.converged`.
        out_dtype: dtype of the returned clustered weights; default fp32 like ``dkm_autograd``.
            Passing ``weights.dtype`` gives what the caller's cast would, without the fp32 copy.

    Returns:
        (W_hat with ``weights``' shape, final fp32 centroids with ``centroids``' shape).

    Memory: saves for backward a reference to ``weights`` plus O(iters x G x k) numbers; transient
    tables are O(pairs) + O(chunk x k), pairs = distinct (group, value) pairs <= min(|W|, G x 65,536).
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if centroids.dim() not in (1, 2) or centroids.shape[-1] < 1:
        raise ValueError(f"centroids must have shape (k,) or (groups, k), got {tuple(centroids.shape)}")
    groups = 1 if centroids.dim() == 1 else centroids.shape[0]
    if groups < 1 or weights.numel() % groups:
        raise ValueError(f"{weights.numel()} weights cannot be split into {groups} equal groups")
    dtype = sixteen_bit_dtype(weights)
    tau_t = torch.as_tensor(tau.detach() if torch.is_tensor(tau) else tau, dtype=torch.float32)
    tau_t = tau_t.to(weights.device).reshape(-1)
    if tau_t.numel() == 1:
        tau_t = tau_t.expand(groups).contiguous()
    elif tau_t.numel() != groups:
        raise ValueError(f"tau must be a float or have one value per group ({groups}), got {tau_t.numel()}")
    if centroids.device != weights.device:
        raise ValueError(f"centroids on {centroids.device} but weights on {weights.device}")
    return _FusedDKM.apply(weights, centroids, tau_t, int(iters), float(eps), dtype, out_dtype or torch.float32)

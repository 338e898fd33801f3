"""The distinct (group, 16-bit value) pairs of a weight tensor: the domain of unique-domain DKM.

A weight's key is its 16-bit bit pattern (after rounding to the clustering dtype: an fp32 master
weight is rounded on the fly, chunk by chunk, never copied whole), so a pass over the weights
counts the pairs, buckets a gradient by pair, or gathers a per-pair table back to the weights.
:class:`Domain` keeps only O(pairs) numbers; :meth:`Domain.saved` / :meth:`Domain.from_saved`
turn it into two tensors (present keys, counts) that autograd can save for backward instead of
rebuilding it there (pairs <= min(|W|, groups x 65,536)).

Example:
    >>> import torch
    >>> from edkm.memory.domain import Domain
    >>> w = torch.tensor([[0.5, -1.0, 0.5, 0.5]])      # fp32 holding bf16 values, one group
    >>> dom = Domain(w, torch.bfloat16)
    >>> dom.u.tolist(), dom.n.tolist()
    ([0.5, -1.0], [3.0, 1.0])
    >>> out = torch.empty(1, 4); dom.scatter_pairs([dom.u * 10], None, out); out.tolist()
    [[5.0, -10.0, 5.0, 5.0]]
"""

from __future__ import annotations

import bisect

import torch

PATTERNS = 1 << 16  # bit patterns of a 16-bit value
_ELEMS = 1 << 20  # weights per chunk in the passes over the weights (bounds the key buffers)
_TABLE = 1 << 20  # entries per (pairs x k) table chunk (bounds the transient tables)


def patterns(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bit patterns in [0, 65536) as int32 of ``w`` rounded to ``dtype``.

    The values of :func:`edkm.cluster.sixteen.bit_patterns`; int32 keys make ``bincount`` and
    ``index_select`` several times faster than int64 on CPU.
    """
    return w.detach().to(dtype).view(torch.int16).to(torch.int32).bitwise_and_(PATTERNS - 1)


class Domain:
    """The distinct (group, value) pairs of a (G, N) tensor of (rounded) 16-bit values.

    Groups are visited in batches; in a batch a weight's key is ``local group * 65,536 + bit
    pattern``. Large groups (N >= 8,192) use a dense 65,536-entry table per group indexed by the
    key itself (one O(N) counting pass, no sort); small groups (many per-channel LUTs) would make
    those tables cost more than the weights, so their batches find the present keys with a sort
    (``torch.unique``) and map a key to its pair with ``searchsorted``. Pairs are ordered by group,
    then bit pattern. Attributes (U = number of pairs): ``u`` (U,) fp32 values, ``n`` (U,) fp64
    counts, ``gid`` (U,) int64 group of each pair, ``gsum`` (U,) fp64 bucketed gradient (after
    :meth:`bucket`).
    """

    def __init__(self, w2: torch.Tensor, dtype: torch.dtype, saved: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.w2, self.dtype = w2, dtype
        self.groups, self.cols = w2.shape
        self.dense = self.cols * 8 >= PATTERNS
        if self.dense:
            self.batch = max(1, min(self.groups, _ELEMS // PATTERNS))
            self.step = max(1, _ELEMS // self.batch)
        else:
            self.batch = max(1, min(self.groups, _ELEMS // max(self.cols, 1)))
            self.step = max(self.cols, 1)
        self.gsum: torch.Tensor | None = None
        self.present: list[tuple[int, int, torch.Tensor, int]] = []  # (g0, g1, sorted present keys, pair offset)
        if saved is not None:
            keys, counts = saved
            bounds = (
                torch.arange(0, self.groups + self.batch, self.batch, device=keys.device).clamp_max(self.groups)
                * PATTERNS
            )
            cuts = torch.searchsorted(keys, bounds).tolist()  # keys are batch-global: g * 65,536 + pattern
            for i, g0 in enumerate(range(0, self.groups, self.batch)):
                g1 = min(g0 + self.batch, self.groups)
                self.present.append((g0, g1, keys[cuts[i] : cuts[i + 1]] - g0 * PATTERNS, cuts[i]))
            self._derive(counts)
            return
        counts_all, ones = [], torch.ones(1, dtype=torch.int64, device=w2.device)
        offset = 0
        for g0 in range(0, self.groups, self.batch):
            g1 = min(g0 + self.batch, self.groups)
            if self.dense:
                counts = torch.zeros((g1 - g0) * PATTERNS, dtype=torch.int64, device=w2.device)
                for _, key in self._keys(g0, g1):  # index_add_ with int32 keys: faster than bincount on CPU
                    counts.index_add_(0, key, ones.expand(key.numel()))
                present = counts.nonzero().squeeze(1)
                counts = counts[present]
            else:
                ((_, key),) = self._keys(g0, g1)
                present, counts = torch.unique(key, sorted=True, return_counts=True)
            self.present.append((g0, g1, present, offset))
            counts_all.append(counts)
            offset += present.numel()
        self._derive(torch.cat(counts_all))

    def _derive(self, counts: torch.Tensor) -> None:
        """Values, counts and groups of the pairs from the present keys (absent NaN/Inf patterns never appear)."""
        keys = torch.cat([p for _, _, p, _ in self.present])
        g0s = torch.cat(
            [torch.full((p.numel(),), g0, dtype=torch.int64, device=keys.device) for g0, _, p, _ in self.present]
        )
        self.u = (keys & (PATTERNS - 1)).to(torch.int16).view(self.dtype).float()
        self.n = counts.to(torch.float64)
        self.gid = g0s + torch.div(keys, PATTERNS, rounding_mode="floor")
        self.size = self.u.numel()
        # group boundaries in pair order (one host sync), used to sum single-group chunks without a scatter
        self.starts = [0, *torch.bincount(self.gid, minlength=self.groups).cumsum(0).tolist()]

    def saved(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global keys g * 65,536 + pattern (int64, ascending), int32 counts): what rebuilds this domain."""
        keys = torch.cat([p.to(torch.int64) + g0 * PATTERNS for g0, _, p, _ in self.present])
        return keys, self.n.to(torch.int32)

    def nbytes(self) -> int:
        """Bytes of :meth:`saved` (12 per pair)."""
        return 12 * self.size

    def _keys(self, g0: int, g1: int):
        """(column offset, keys) for column chunks of the groups g0:g1 (int32 dense, int64 sparse)."""
        rows = self.w2[g0:g1]
        itype = torch.int32 if self.dense else torch.int64
        base = None
        if g1 - g0 > 1:
            base = (torch.arange(g1 - g0, device=rows.device, dtype=itype) * PATTERNS).unsqueeze(1)
        for a in range(0, max(self.cols, 1), self.step):
            key = patterns(rows[:, a : a + self.step], self.dtype).to(itype)
            if base is not None:
                key = key + base
            yield a, key.reshape(-1)

    def bucket(self, grad2: torch.Tensor) -> None:
        """``gsum`` = the (G, N) gradient summed per pair (fp64), one pass over the weights."""
        sums = []
        for g0, g1, present, _ in self.present:
            if self.dense:
                full = torch.zeros((g1 - g0) * PATTERNS, dtype=torch.float64, device=grad2.device)
                for a, key in self._keys(g0, g1):
                    full.index_add_(0, key, grad2[g0:g1, a : a + self.step].reshape(-1).to(torch.float64))
                sums.append(full[present])
            else:
                ((_, key),) = self._keys(g0, g1)
                s = torch.zeros(present.numel(), dtype=torch.float64, device=grad2.device)
                s.index_add_(0, torch.searchsorted(present, key), grad2[g0:g1].reshape(-1).to(torch.float64))
                sums.append(s)
        self.gsum = torch.cat(sums)

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
                    f = torch.zeros((g1 - g0) * PATTERNS, dtype=dtype, device=out.device)
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

"""The DKM layers of training: one :class:`ClusteredWeight` per weight tensor, one :class:`DKMModule` per layer.

A DKM module computes with soft-clustered weights in training mode and hard-clustered ones in eval mode.
The weight Parameter stays as it is (fp32 master weights train with any optimizer); each step it is
rounded to 16 bits (gradient straight through) and clustered by :func:`edkm.memory.layer.cluster_weight`,
which keeps for backward only small tables (a Linear recomputes W_hat when backward needs it). Tied weights
(embedding = output layer) share one ClusteredWeight, clustered once per model forward
(:class:`~edkm.layers.tied.ForwardScope`). :mod:`edkm.transform` puts these layers into a model
(``palettize_``) and takes them out (``finalize_``).

tau: the spec's relative temperature, annealed geometrically to ``spec.tau_end`` as the training
``progress`` (0 -> 1, set by :func:`edkm.transform.anneal_`) advances; the absolute temperature of a LUT is
that times its ``scale`` (docs/method.md §2).

Example:
    >>> import torch
    >>> from edkm.config import LayerSpec
    >>> cw = ClusteredWeight(LayerSpec(bits=2, tau=0.2, tau_end=0.002), torch.Size([4, 8]), torch.bfloat16)
    >>> cw.tau, (cw.anneal(1.0), round(cw.tau, 6))[1]
    (0.2, 0.002)
    >>> cw(torch.randn(4, 8)).shape            # training mode: DKM
    torch.Size([4, 8])
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from edkm.cluster import decode, hard_assign, kmeans1d
from edkm.config import LayerSpec
from edkm.layers.base import WrappedLayer
from edkm.layers.lut import LUT_DTYPE
from edkm.layers.tied import ForwardScope
from edkm.memory.fused_layer import fused_embedding, fused_linear, supports
from edkm.memory.layer import Clustered, cluster_weight, clustered_linear
from edkm.memory.plan import parse_memory


def tau_scale(centroids: torch.Tensor) -> torch.Tensor:
    """Per-LUT unit of tau: the median squared gap between neighbouring sorted centroids."""
    gaps = torch.diff(torch.sort(centroids, dim=-1).values, dim=-1).square().reshape(len(centroids), -1)
    scale = gaps.where(gaps > 0, torch.nan).nanmedian(dim=-1).values  # lower median of the positive gaps
    return scale.nan_to_num(1e-12)


class ClusteredWeight(nn.Module):
    """DKM state of one weight tensor: warm-start centroids (G, k) and the tau unit per LUT."""

    #: False: ``forward`` / :meth:`cluster` / :meth:`fused_layer` take the whole weight. True (sharded DKM,
    #: :class:`edkm.distributed.clustered.ShardedClusteredWeight`): ``forward`` takes this rank's rows and
    #: returns the whole clustered weight, and the single-process layer kernels do not apply.
    takes_shards = False

    def __init__(
        self,
        spec: LayerSpec,
        shape: torch.Size,
        cluster_dtype: torch.dtype,
        memory: str = "auto",
        scope: ForwardScope | None = None,
    ) -> None:
        super().__init__()
        rows = shape[0]
        if spec.group_size is not None and rows % spec.group_size:
            raise ValueError(
                f"group_size {spec.group_size} does not divide the {rows} output channels of a {tuple(shape)} weight"
            )
        self.spec, self.shape, self.cluster_dtype = spec, torch.Size(shape), cluster_dtype
        self.groups = 1 if spec.group_size is None else rows // spec.group_size
        self.progress = 0.0  # training progress 0 -> 1: where tau is on its annealing schedule
        self.register_buffer("centroids", torch.zeros(self.groups, spec.k))
        self.register_buffer("scale", torch.zeros(self.groups))
        self.register_buffer("initialized", torch.tensor(False))
        self.scope = scope  # clustered weights of the current model forward (tied weights), or None
        self.tied = False  # set by palettize_ when several modules share the weight
        self.memory, self.plan = memory, parse_memory(memory)  # how DKM holds its tensors: changes no value

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, groups={self.groups}, iters={self.spec.iters}, memory={self.memory!r}"

    @property
    def tau(self) -> float:
        """The relative temperature now: ``spec.tau`` annealed geometrically to ``spec.tau_end`` over ``progress``."""
        spec = self.spec
        return spec.tau if spec.tau_end is None else spec.tau * (spec.tau_end / spec.tau) ** self.progress

    def anneal(self, progress: float) -> None:
        """Move tau along its schedule: ``progress`` 0 at the first training step, 1 at the last."""
        self.progress = float(progress)

    @torch.no_grad()
    def initialize(self, w16: torch.Tensor, importance: torch.Tensor | None = None) -> None:
        """First-step hard k-means on the 16-bit weights (activation-aware with ``importance``: see
        :func:`edkm.cluster.kmeans.kmeans1d`; :func:`edkm.transform.warm_start_` supplies it)."""
        c = kmeans1d(w16, self.spec.k, groups=self.groups, importance=importance)
        self.centroids.copy_(c)
        self.scale.copy_(tau_scale(c))
        self.initialized.fill_(True)

    def hard(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 indices (G, n), fp16 LUT (G, k)) of the 16-bit-rounded weight."""
        w16 = weight.detach().to(self.cluster_dtype)
        if not self.initialized:
            self.initialize(w16)
        idx, lut = hard_assign(w16, self.centroids)
        return idx, lut.to(LUT_DTYPE)

    def hard_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight decoded from its hard assignment, exactly as the finalized LUT module computes it."""
        idx, lut = self.hard(weight)
        return decode(lut, idx, self.shape, weight.dtype)

    def cluster(self, weight: torch.Tensor) -> Clustered:
        """This step's clustered weight (training: DKM, advancing the warm start; eval: hard)."""
        key = (weight._version, self.training, torch.is_grad_enabled())
        cached = None if self.scope is None else self.scope.get(self, key)
        if cached is not None:
            return cached  # a tied weight already clustered in this forward
        if self.training:
            if not self.initialized:
                self.initialize(weight.detach().to(self.cluster_dtype))
            tau = self.tau * self.scale if self.groups > 1 else float(self.tau * self.scale)
            out = cluster_weight(
                weight,
                self.centroids,
                tau=tau,
                iters=self.spec.iters,
                eps=self.spec.eps,
                dtype=self.cluster_dtype,
                memory=self.plan,
            )
            self.centroids.copy_(out.centroids.reshape(self.centroids.shape))
            if self.spec.hard_forward:
                soft = out.w_hat
                hard = soft + (self.hard_weight(weight) - soft).detach()
                out = out.replaced(
                    hard,
                    partial(hard_forward_recompute, out.recompute, self.cluster_dtype),
                    [out.centroids, *out.tables],
                )
        else:
            w = self.hard_weight(weight)
            out = Clustered(weight, w, self.centroids, lambda _w: w)
        if self.scope is not None:
            self.scope.put(self, key, out)
        return out

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.cluster(weight).w_hat

    def fused_layer(self, module: WrappedLayer, x: torch.Tensor) -> torch.Tensor | None:
        """The training output of ``module`` by the fused layer kernels (no W_hat built; see
        :mod:`edkm.memory.fused_layer`), or None where they do not apply (tied, grouped or small
        weights, a paper memory mode, hard_forward, eval, no grad, embedding options)."""
        weight, spec = module.weight, self.spec
        if not (
            self.training
            and torch.is_grad_enabled()
            and not self.tied
            and not spec.hard_forward
            and (self.plan.fused or self.plan.auto)
            and supports(weight, self.centroids)
        ):
            return None
        embedding = module.base_type == "Embedding"
        if embedding and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
            return None
        if not self.initialized:
            self.initialize(weight.detach().to(self.cluster_dtype))
        opts = dict(tau=float(self.tau * self.scale), iters=spec.iters, eps=spec.eps, dtype=self.cluster_dtype)
        if embedding:
            out, c = fused_embedding(x, weight, self.centroids, padding_idx=module.padding_idx, **opts)
        else:
            out, c = fused_linear(x, weight, module.bias, self.centroids, **opts)
        self.centroids.copy_(c.reshape(self.centroids.shape))
        return out


def hard_forward_recompute(
    soft_recompute, cluster_dtype: torch.dtype, weight: torch.Tensor, centroids: torch.Tensor, *tables: torch.Tensor
) -> torch.Tensor:
    """The hard_forward value W_soft + (W_hard - W_soft) again, from the step's centroids."""
    soft = soft_recompute(weight, *tables)
    idx, lut = hard_assign(weight.detach().to(cluster_dtype), centroids.reshape(-1, centroids.shape[-1]))
    return soft + (decode(lut.to(LUT_DTYPE), idx, weight.shape, weight.dtype) - soft)


class DKMModule(WrappedLayer):
    """A Linear / Embedding / Conv1D layer whose weight is DKM-clustered on the fly (output channels first)."""

    def __init__(self, base: nn.Module, clusterer: ClusteredWeight) -> None:
        super().__init__(base)
        self.clusterer = clusterer

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.clusterer.takes_shards:  # sharded DKM: gathered clustered rows (edkm.distributed.clustered)
            return self.clusterer.layer_forward(self, x, *args, **kwargs)
        if self.shell is not None or self.transposed:  # Conv1D, a subclass's own forward: on the clustered weight
            return self._compute(x, self.clusterer(self.rows_first(self.weight)), *args, **kwargs)
        out = self.clusterer.fused_layer(self, x)
        if out is not None:
            return out
        clustered = self.clusterer.cluster(self.weight)
        if self.base_type == "Linear":
            return clustered_linear(x, clustered, self.bias)  # keeps x and small tables, not W_hat
        return self._compute(x, clustered.w_hat)  # F.embedding keeps only its indices

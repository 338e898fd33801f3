"""Clustered weights kept as row shards: the module side of sharded DKM, and per-shard hard assignment.

:func:`shard_clustered_weights_` turns every clustered weight of a palettized model into a
``Shard(0)`` DTensor Parameter (this rank's rows of the fp32 master weight) and its
:class:`~edkm.layers.dkm.ClusteredWeight` into a :class:`ShardedClusteredWeight`, which clusters only
those rows (:func:`edkm.distributed.sharded.sharded_dkm`) and all-gathers the clustered rows.
FSDP must then ignore these Parameters (``fully_shard(..., ignored_params=...)``): they are already
sharded, and AdamW, ``clip_grad_norm_`` and torch.distributed.checkpoint handle them as the
DTensors they are. :func:`hard_assignment` computes the export's indices per shard and gathers
only the uint8 indices, never the fp32 weight.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DeviceMesh, DTensor, Shard

from edkm.cluster.sixteen import cast_straight_through
from edkm.distributed.sharded import GatheredLinear, GatherRows, local_rows, sharded_dkm
from edkm.layers.dkm import ClusteredWeight, DKMModule
from edkm.layers.lut import LUT_DTYPE
from edkm.transform import clustered_modules


def local_hard_indices(
    local: torch.Tensor, centroids: torch.Tensor, cluster_dtype: torch.dtype, row_start: int, group_rows: int
) -> torch.Tensor:
    """(rows, cols) nearest-centroid indices of the rows [row_start, ...) of a weight, exactly as
    :func:`edkm.cluster.hard_assign` gives them for the whole weight (uint8, or int32 above 256 entries)."""
    x = local.detach().to(cluster_dtype).float()
    lut = torch.sort(centroids.float(), dim=-1).values
    mid = (lut[:, :-1] + lut[:, 1:]) / 2
    gid = torch.div(torch.arange(row_start, row_start + x.shape[0], device=x.device), group_rows, rounding_mode="floor")
    idx = torch.searchsorted(mid[gid].contiguous(), x.reshape(x.shape[0], -1).contiguous())
    return idx.to(torch.uint8 if lut.shape[1] <= 256 else torch.int32)


class ShardedClusteredWeight(ClusteredWeight):
    """A :class:`ClusteredWeight` whose weight is this rank's rows (a ``Shard(0)`` DTensor).

    ``takes_shards`` is True: :class:`~edkm.layers.dkm.DKMModule` computes with ``forward``'s gathered
    weight, never with the single-process kernels (``fused_layer``, ``cluster``), which refuse.

    ``forward(weight)`` returns the full clustered weight (all ranks' rows gathered, autograd-aware).
    ``out_dtype`` casts it for the matmul (bf16 under a bf16 mixed-precision policy; None keeps fp32).
    ``regather``: a Linear keeps only this rank's clustered rows for backward and gathers them again
    there (:class:`~edkm.distributed.sharded.GatheredLinear`, what FSDP does for the weights it
    manages); off under activation checkpointing, which recomputes the layer anyway.
    """

    takes_shards = True

    def __init__(self, base: ClusteredWeight, mesh: DeviceMesh, tied: bool) -> None:
        super().__init__(base.spec, base.shape, base.cluster_dtype, base.memory, base.scope)
        self.load_state_dict(base.state_dict())
        self.progress, self.training = base.progress, base.training
        self.group = mesh.get_group()
        self.rows = self.shape[0]
        self.row_start, self.row_end = local_rows(self.rows, mesh.get_local_rank(), mesh.size())
        self.group_rows = self.rows // self.groups
        self.tied = tied  # a tied Parameter's second user reuses the clustered rows (the model forward's scope)
        self.out_dtype: torch.dtype | None = None
        self.regather = True
        self.recomputing = False  # set during activation-checkpoint recomputation

    def _local(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to_local() if isinstance(weight, DTensor) else weight[self.row_start : self.row_end]

    def local_hard(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest-centroid indices of this rank's rows (see :func:`local_hard_indices`)."""
        return local_hard_indices(
            self._local(weight), self.centroids, self.cluster_dtype, self.row_start, self.group_rows
        )

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The full clustered weight (every rank's rows, gathered)."""
        return GatherRows.apply(self.clustered_rows(weight), self.rows, self.group)

    def layer_forward(self, module: DKMModule, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """``module``'s output for ``x`` with the clustered weight gathered from every rank."""
        local = self.clustered_rows(module.rows_first(module.weight))
        if self.regather and module.base_type == "Linear" and module.shell is None:
            return GatheredLinear.apply(x, local, module.bias, self.rows, self.group)
        return module._compute(x, GatherRows.apply(local, self.rows, self.group), *args, **kwargs)

    def clustered_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the clustered weight (differentiable); clustered once per model forward."""
        key = ("rows", self.training, torch.is_grad_enabled())
        cached = None if self.scope is None or self.recomputing else self.scope.get(self, key)
        if cached is not None:
            return cached  # a tied weight already clustered in this model forward
        local = self._local(weight)
        if self.training:
            w16 = local if local.dtype == self.cluster_dtype else cast_straight_through(local, self.cluster_dtype)
            tau = (self.tau * self.scale).float()
            out, c = sharded_dkm(
                w16.reshape(local.shape[0], -1),
                self.centroids,
                tau=tau,
                iters=self.spec.iters,
                eps=self.spec.eps,
                row_offset=self.row_start,
                group_rows=self.group_rows,
                dtype=self.cluster_dtype,
                group=self.group,
            )
            self.centroids.copy_(c.detach())
            out = out.reshape(local.shape)
            if self.spec.hard_forward:
                out = out + (self._decode_local(weight) - out).detach()
        else:
            out = self._decode_local(weight)
        out = out.to(self.out_dtype or local.dtype)
        if self.scope is not None and not self.recomputing:  # dropped when the model forward ends
            self.scope.put(self, key, out)
        return out

    def cluster(self, weight: torch.Tensor):  # type: ignore[override]
        raise RuntimeError(
            "a sharded clusterer returns the gathered clustered weight from forward(rows); "
            "cluster() takes whole weights"
        )

    def fused_layer(self, module, x: torch.Tensor) -> None:  # type: ignore[override]
        raise RuntimeError(
            "the fused layer kernels take whole weights, not a rank's rows (DKMModule routes sharded DKM to forward)"
        )

    def _decode_local(self, weight: torch.Tensor) -> torch.Tensor:
        lut = torch.sort(self.centroids.float(), dim=-1).values.to(LUT_DTYPE)
        gid = torch.arange(self.row_start, self.row_end, device=lut.device) // self.group_rows
        idx = self.local_hard(weight).long().reshape(len(gid), -1)
        local = self._local(weight)
        return torch.gather(lut[gid].to(local.dtype), 1, idx).reshape(local.shape)


def shard_clustered_weights_(model: nn.Module, mesh: DeviceMesh) -> set[nn.Parameter]:
    """Replace every clustered weight by this rank's rows (DTensor) and its clusterer by a sharded one.

    Initialises each clusterer (first-step k-means) on the full weight first, identically on every
    rank. Returns the new Parameters, for ``fully_shard(..., ignored_params=...)``.
    """
    modules = clustered_modules(model)
    users: dict[int, int] = {}
    for _, m in modules:
        users[id(m.clusterer)] = users.get(id(m.clusterer), 0) + 1
    new_params: dict[int, nn.Parameter] = {}
    new_clusterers: dict[int, ShardedClusteredWeight] = {}
    for name, module in modules:
        cw, weight = module.clusterer, module.weight
        if isinstance(weight, DTensor):
            raise RuntimeError(
                "shard_clustered_weights_ must run before fully_shard (the weights are DTensors already)"
            )
        if module.transposed:
            raise ValueError(
                f"sharded DKM needs (out, in) weights; layer {name!r} stores its weight transposed (Conv1D): "
                "use --fsdp-gathered-dkm (FSDPOptions(sharded_dkm=False))"
            )
        if id(cw) not in new_clusterers:
            if not cw.initialized:
                cw.initialize(weight.detach().to(cw.cluster_dtype))
            new_clusterers[id(cw)] = ShardedClusteredWeight(cw, mesh, tied=users[id(cw)] > 1).to(weight.device)
        sharded = new_clusterers[id(cw)]
        if id(weight) not in new_params:
            local = weight.detach()[sharded.row_start : sharded.row_end].clone()
            dt = DTensor.from_local(
                local, mesh, [Shard(0)], shape=weight.shape, stride=weight.stride(), run_check=False
            )
            new_params[id(weight)] = nn.Parameter(dt, requires_grad=weight.requires_grad)
        module.clusterer = sharded
        module.register_parameter("weight", new_params[id(weight)])
    for m in model.modules():  # any other module sharing a replaced Parameter (e.g. a tied head left unclustered)
        for name, p in list(m._parameters.items()):
            if p is not None and id(p) in new_params and not isinstance(m, DKMModule):
                raise ValueError(f"a clustered weight is also used by unclustered module {type(m).__name__}.{name}")
    return set(new_params.values())


def hard_assignment(module: DKMModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (G, n), fp16 LUT (G, k)) of a clustered weight under FSDP, gathering only the indices.

    Works for a sharded clusterer and for an FSDP-managed ``Shard(0)`` weight alike; a collective.
    """
    cw, weight = module.clusterer, module.weight
    if not isinstance(weight, DTensor):
        return cw.hard(weight)
    mesh = weight.device_mesh
    start, end = local_rows(cw.shape[0], mesh.get_local_rank(), mesh.size())
    idx = local_hard_indices(weight.to_local(), cw.centroids, cw.cluster_dtype, start, cw.shape[0] // cw.groups)
    p = -(-cw.shape[0] // mesh.size())
    padded = idx.new_zeros((p, idx.shape[1]))
    padded[: idx.shape[0]] = idx
    full = idx.new_empty((mesh.size() * p, idx.shape[1]))
    dist.all_gather_single(full, padded, group=mesh.get_group())
    lut = torch.sort(cw.centroids.float().reshape(cw.groups, -1), dim=-1).values
    return full[: cw.shape[0]].reshape(cw.groups, -1), lut.to(LUT_DTYPE)

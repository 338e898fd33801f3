"""eDKM memory techniques for DKM's saved tensors (SPEC §3-§5).

``edkm.dkm(w, c, ..., memory=spec)`` hands every spec but "plain" to :func:`dkm_with_memory`:

* "marshal" (M), "unique" (U), "shard" (S) and their "+"-joined combinations run the plain DKM
  (``dkm_autograd``) under saved-tensor hooks (:class:`~edkm.memory.hooks.SavedTensorHooks`) that
  store what autograd saves once per storage, as distinct rows + index, sharded, on the host;
  values, gradients and centroids are bit-identical to plain DKM;
* "fused" computes DKM in the unique domain (:mod:`edkm.memory.fused`, SPEC §4);
* "auto" picks fused for exact 16-bit weights, else marshal (+ shard under torch.distributed).

Layer level (what ``palettize_`` uses; the public core others build on):

* :func:`cluster_weight(weight, centroids, *, tau, iters, eps=0.0, dtype=torch.bfloat16, memory="auto")
  <edkm.memory.layer.cluster_weight>` -> :class:`Clustered` ``(weight, w_hat, centroids, recompute, tables)``:
  DKM of a master weight rounded to 16 bits inside the autograd function (gradient straight
  through); W_hat can be recomputed from the small tables (``Clustered.again()``);
* :func:`clustered_linear(x, clustered, bias=None) <edkm.memory.layer.clustered_linear>`: a Linear on
  it that keeps x and the tables for backward, never W_hat;
* :func:`fused_linear(x, weight, bias, centroids, *, tau, iters, eps=0.0, dtype=torch.bfloat16)
  <edkm.memory.fused_layer.fused_linear>` and :func:`fused_embedding(ids, weight, centroids, *, tau,
  iters, eps=0.0, dtype=torch.bfloat16, padding_idx=None) <edkm.memory.fused_layer.fused_embedding>`
  -> ``(output, new centroids)``: one LUT per tensor, W_hat never built (row blocks).

Measure with :func:`track_saved`::

    with edkm.memory.track_saved() as stats:
        w_hat, c = edkm.dkm(w, c, tau=tau, iters=3, memory="marshal+unique")
    w_hat.sum().backward()
    print(stats.device_bytes, stats.host_bytes, stats.copied_bytes)
"""

from __future__ import annotations

import torch

from .fused_layer import fused_embedding, fused_linear
from .hooks import SavedTensorHooks
from .layer import Clustered, cluster_weight, clustered_linear
from .plan import MemoryPlan, parse_memory
from .stats import SavedStats, current_stats, track_saved

__all__ = [
    "Clustered",
    "cluster_weight",
    "clustered_linear",
    "fused_linear",
    "fused_embedding",
    "MemoryPlan",
    "parse_memory",
    "dkm_with_memory",
    "SavedTensorHooks",
    "SavedStats",
    "track_saved",
    "current_stats",
]


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
    from ..cluster.dkm import dkm_autograd

    plan, dtype = (memory if isinstance(memory, MemoryPlan) else parse_memory(memory)).decide(weights)
    if plan.fused:
        from .fused import fused_dkm

        return fused_dkm(weights, centroids, tau=tau, iters=iters, eps=eps, dtype=dtype)
    if plan.plain:
        return dkm_autograd(weights, centroids, tau, iters, eps)
    with SavedTensorHooks(plan, weights, centroids, dtype=dtype):
        return dkm_autograd(weights, centroids, tau, iters, eps)

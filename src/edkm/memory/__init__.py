"""eDKM memory techniques for DKM's saved tensors (docs/method.md §3-§5).

``edkm.dkm(w, c, ..., memory=spec)`` hands every spec but "plain" to :func:`dkm_with_memory`:

* "marshal" (M), "unique" (U), "shard" (S) and their "+"-joined combinations run the plain DKM
  (``dkm_autograd``) under saved-tensor hooks (:class:`~edkm.memory.hooks.SavedTensorHooks`) that
  store what autograd saves once per storage, as distinct rows + index, sharded, on the host;
  values, gradients and centroids are bit-identical to plain DKM;
* "fused" computes DKM in the unique domain (:mod:`edkm.memory.fused`, docs/method.md §4);
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

from edkm.memory.fused_layer import fused_embedding, fused_linear
from edkm.memory.hooks import SavedTensorHooks
from edkm.memory.layer import Clustered, cluster_weight, clustered_linear
from edkm.memory.modes import dkm, dkm_with_memory
from edkm.memory.plan import MemoryPlan, parse_memory
from edkm.memory.stats import SavedStats, current_stats, track_saved

__all__ = [
    "dkm",
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

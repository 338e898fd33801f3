"""FSDP2 fine-tuning of a palettized model: ``fully_shard`` per decoder layer and on the root.

Recipe (under ``torchrun``; gloo on CPU, NCCL on CUDA, chosen by :func:`init_distributed`)::

    import edkm
    from edkm.distributed import FSDPOptions, fsdp_, init_distributed
    init_distributed()
    edkm.palettize_(model, edkm.PalettizeConfig(bits=3))      # FIRST: wrappers before sharding
    fsdp_(model, FSDPOptions(mixed_precision="bf16", activation_checkpointing=True))  # "fp64": same steps on any N
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)      # DTensor parameters: 1/N per rank
    ... loss.backward(); opt.step() ...
    edkm.distributed.save_fsdp_palettized(model, "model.edkm.safetensors")  # same file as one process

``sharded_dkm=True`` (default) keeps each clustered weight as row shards clustered per rank
(:mod:`edkm.distributed.clustered`); ``False`` lets FSDP gather the weight and every rank runs
DKM on the whole of it. Activation checkpointing recomputes each decoder layer in backward; the
warm-start centroids the forward used are restored for the recomputation, so it is exact.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from edkm.distributed.clustered import ShardedClusteredWeight, shard_clustered_weights_
from edkm.distributed.device import init_distributed as join_process_group
from edkm.distributed.device import resolve_device
from edkm.layers.dkm import ClusteredWeight
from edkm.ranks import is_distributed, rank_world
from edkm.transform import clustered_modules

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class FSDPOptions:
    """How :func:`fsdp_` shards a palettized model.

    Args:
        mixed_precision: None (fp32 compute) or "bf16"/"fp16": ``MixedPrecisionPolicy`` param dtype
            (gradients reduced in fp32, fp32 master weights kept); "fp64": compute and every gradient
            sum in float64 over the fp32 master weights, so the rounding of a sum no longer depends on
            how the batch is split over processes: 1, 2 and 4 processes take the same steps.
        activation_checkpointing: recompute every decoder layer in backward.
        sharded_dkm: each rank clusters only its rows of every clustered weight (else DKM runs on
            the weight FSDP gathered, the same work on every rank).
    """

    mixed_precision: str | None = None
    activation_checkpointing: bool = False
    sharded_dkm: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in (None, *PRECISIONS):
            raise ValueError(f"mixed_precision must be None, 'bf16', 'fp16' or 'fp64', got {self.mixed_precision!r}")

    def policy(self) -> MixedPrecisionPolicy:
        """FSDP2's policy: compute in the chosen dtype, gradients reduced in fp32 (fp64 under "fp64")."""
        dtype = PRECISIONS.get(self.mixed_precision or "")
        if dtype is None:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(
            param_dtype=dtype, reduce_dtype=torch.float64 if dtype == torch.float64 else torch.float32
        )


def init_distributed() -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (NCCL with CUDA, else gloo).

    Returns (rank, world size); (0, 1) outside torchrun. With CUDA each rank uses device LOCAL_RANK.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        join_process_group(resolve_device("auto"))  # the rank's LOCAL_RANK GPU and NCCL, else gloo
    return rank_world()


def default_mesh() -> DeviceMesh:
    """A 1-D mesh over every rank of the default group (CUDA when available, else CPU)."""
    if not is_distributed():
        raise RuntimeError("FSDP needs torch.distributed initialised: run under torchrun (or call init_distributed())")
    return init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the children of every ``nn.ModuleList`` (e.g. ``model.layers``)."""
    return [layer for m in model.modules() if isinstance(m, nn.ModuleList) for layer in m]


def _centroid_contexts(clusterers: list[ClusteredWeight]):
    """Forward / recompute context managers for checkpoint(context_fn=...): the recomputation sees
    the warm-start centroids the forward saw, and afterwards the updated ones are back."""
    snapshot: list[torch.Tensor] = []

    @contextlib.contextmanager
    def forward() -> Iterator[None]:
        snapshot[:] = [cw.centroids.clone() for cw in clusterers]
        yield

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        after = [cw.centroids.clone() for cw in clusterers]
        for cw, before in zip(clusterers, snapshot):
            cw.centroids.copy_(before)
            cw.recomputing = True
        try:
            yield
        finally:
            for cw, value in zip(clusterers, after):
                cw.centroids.copy_(value)
                cw.recomputing = False

    return forward(), recompute()


def checkpoint_layer_(layer: nn.Module) -> None:
    """Activation checkpointing (non-reentrant) of ``layer``'s forward, exact with DKM inside."""
    clusterers = list({id(m): m for m in layer.modules() if isinstance(m, ClusteredWeight)}.values())
    inner = layer.forward

    def forward(*args, **kwargs):
        return checkpoint(
            inner, *args, use_reentrant=False, context_fn=lambda: _centroid_contexts(clusterers), **kwargs
        )

    layer.forward = forward


def fsdp_(model: nn.Module, options: FSDPOptions | None = None, mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard a palettized ``model`` in place with FSDP2 (per decoder layer, then the root); returns it.

    Raises ValueError when the model is not palettized yet (``palettize_`` must come first: a
    wrapper added after sharding mixes plain tensors with DTensors) or is sharded already.
    """
    options = options or FSDPOptions()
    if not clustered_modules(model):
        raise ValueError("fsdp_ needs a palettized model: call edkm.palettize_(model, config) before fsdp_")
    if any(type(m).__name__.startswith("FSDP") for m in model.modules()):
        raise ValueError("model is already sharded with fully_shard")
    mesh = mesh or default_mesh()
    ignored = shard_clustered_weights_(model, mesh) if options.sharded_dkm else set()
    for m in model.modules():
        if isinstance(m, ShardedClusteredWeight):
            m.out_dtype = PRECISIONS.get(options.mixed_precision or "")
            m.regather = not options.activation_checkpointing
    return shard_layers_(model, options, mesh, ignored)


def shard_layers_(
    model: nn.Module,
    options: FSDPOptions | None = None,
    mesh: DeviceMesh | None = None,
    ignored: set[nn.Parameter] | None = None,
) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root, with ``options``' precision policy and
    activation checkpointing; for any model (``edkm compress --fsdp`` shards its fp control this way)."""
    options = options or FSDPOptions()
    mesh = mesh or default_mesh()
    policy = options.policy()
    for layer in decoder_layers(model):
        if options.activation_checkpointing:
            checkpoint_layer_(layer)
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    return model

"""Which device a command runs on (``--device auto|cpu|cuda``) and the matching process group.

``auto`` is CUDA when PyTorch sees a GPU, else the CPU. Under ``torchrun`` each rank takes the GPU
of its ``LOCAL_RANK`` and the backend follows the device: NCCL for CUDA tensors, gloo for CPU ones
(NCCL cannot move CPU tensors).

Example:
    >>> from edkm.distributed.device import resolve_device, backend_for
    >>> resolve_device("cpu"), backend_for(resolve_device("cpu"))
    (device(type='cpu'), 'gloo')
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from edkm.ranks import is_distributed

CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> Any:
    """``torch.device`` for ``name``; under torchrun a CUDA device is the rank's ``LOCAL_RANK`` GPU.

    Raises:
        ValueError: an unknown name. RuntimeError: "cuda" on a machine without a usable GPU.
    """
    if name not in CHOICES:
        raise ValueError(f"device must be one of {', '.join(CHOICES)}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda: PyTorch sees no CUDA GPU here (use --device cpu or auto)")
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def backend_for(device: Any) -> str:
    """The torch.distributed backend for tensors on ``device``: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: Any, single: bool = False) -> None:
    """Join the torchrun process group (WORLD_SIZE > 1) with the backend ``device`` needs.

    ``single``: outside torchrun, a process group of one (so ``--fsdp`` runs the same sharded code
    in one process: the reference a multi-process run is compared with).
    """
    if is_distributed():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend_for(device))
    elif single:
        dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1)

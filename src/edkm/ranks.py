"""This process's place in torch.distributed: the one lookup of rank and world size the package uses.

Without an initialised process group a process is rank 0 of 1, so single-process code needs no branch.

Example:
    >>> rank_world(), is_distributed()
    ((0, 1), False)
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank_world(group: Any = None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (default: the default group); (0, 1) without a process group."""
    if is_distributed():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1

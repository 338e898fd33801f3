"""Sharding (S): under data parallelism each of N ranks keeps 1/N of what every rank would hold.

Every rank holds identical weights (and warm-start centroids), so what DKM saves per weight is
identical on every rank. With uniquification (U) the sharded tensor is U's index list (one per
DKM call, shared by all its saved maps), as in the paper; without U it is each per-weight saved
map itself ("shard" alone), which needs no 16-bit weights. Rank r keeps elements
[r*p, (r+1)*p) of the flattened tensor, p = ceil(L / N), the last piece zero-padded; backward
all-gathers the pieces (one ``all_gather`` on the default group per unpack of a sharded tensor).

No deadlock: the gathers run only inside backward unpacks, and one device's autograd engine runs
a graph's nodes in a deterministic order, so ranks that build the same DKM graphs (same shapes,
same calls, same backward on one device per rank) issue the same collectives in the same order.
Before sharding, every DKM call checks (one ``all_reduce``) that weights and centroids really are
identical on every rank, and raises on every rank otherwise instead of returning wrong gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from edkm.ranks import is_distributed, rank_world

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def require_group() -> tuple[int, int]:
    """(rank, world size) of the default group; RuntimeError when there is none."""
    if not is_distributed():
        raise RuntimeError(
            "sharding needs torch.distributed initialised (torch.distributed.init_process_group) with identical "
            "weights on every rank; call it first, drop 'shard' from the memory spec, or use memory='auto', "
            "which shards only when a process group with more than one rank exists"
        )
    return rank_world()


@dataclass(frozen=True)
class Shard:
    """This rank's piece of a flat tensor of ``length`` elements."""

    piece: torch.Tensor
    length: int


def shard(flat: torch.Tensor) -> Shard:
    """Keep this rank's 1/N of the 1-D tensor ``flat`` (last piece padded with zeros)."""
    rank, n = require_group()
    length = flat.numel()
    p = -(-length // n)
    piece = flat.new_zeros(p)
    chunk = flat[rank * p : min((rank + 1) * p, length)]
    piece[: chunk.numel()] = chunk
    return Shard(piece, length)


def unshard(s: Shard, device: torch.device) -> torch.Tensor:
    """All-gather the pieces on ``device`` and return the full flat tensor (a collective)."""
    _, n = require_group()
    piece = s.piece.to(device, non_blocking=True).view(torch.uint8)  # bytes: every backend gathers uint8
    pieces = [torch.empty_like(piece) for _ in range(n)]
    dist.all_gather(pieces, piece)
    return torch.cat(pieces).view(s.piece.dtype)[: s.length]


@dataclass
class ShardedFlat:
    """A per-weight saved map kept as this rank's shard; ``flat()`` gathers it back."""

    shard: Shard
    device: torch.device

    def flat(self) -> torch.Tensor:
        return unshard(self.shard, self.device)


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Order-independent integer checksums of ``t``'s bits (sums wrap modulo 2^64 on every rank alike)."""
    bits = t.detach().contiguous().reshape(-1).view(_BITS[t.element_size()]).to(torch.int64)
    pos = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
    return torch.stack([bits.sum(), (bits * pos).sum(), torch.tensor(bits.numel(), device=bits.device)])


def check_replicated(*tensors: torch.Tensor) -> None:
    """Raise RuntimeError on every rank unless ``tensors`` are bit-identical across ranks."""
    require_group()
    fp = torch.cat([_fingerprint(t) for t in tensors])
    both = torch.cat([fp, -fp])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)  # max and -min in one collective
    if not (torch.equal(both[: fp.numel()], fp) and torch.equal(-both[fp.numel() :], fp)):
        raise RuntimeError(
            "memory 'shard' needs identical weights and centroids on every rank (data parallelism); "
            "they differ between ranks"
        )

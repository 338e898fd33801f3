"""Beyond one device: FSDP2 fine-tuning with eDKM (:mod:`.fsdp`), sharded DKM (:mod:`.sharded`,
:mod:`.clustered`) and sharded checkpoints / export (:mod:`.checkpoint`).

Names load on first use, so ``edkm.cli.options`` (the CLI flags) stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "FSDPOptions": "fsdp",
    "fsdp_": "fsdp",
    "init_distributed": "fsdp",
    "shard_layers_": "fsdp",
    "sharded_dkm": "sharded",
    "DCPCheckpointer": "checkpoint",
    "finalize_fsdp_": "checkpoint",
    "save_fsdp_palettized": "checkpoint",
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'edkm.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)

"""The fast post-training peers of ``edkm compress``: GPTQ, SqueezeLLM-style and activation-aware k-means."""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edkm.config import PalettizeConfig
from edkm.data.text import PackedDataset
from edkm.export import save_palettized
from edkm.peers.baselines import ptq_kmeans_
from edkm.peers.calibrate import input_importance
from edkm.peers.gptq import gptq_
from edkm.peers.measure import bits_per_weight
from edkm.peers.squeeze import squeeze_


def calibration(data: PackedDataset, n: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` training sequences (seeded choice): the calibration set of every post-training peer."""
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return data.input_ids[pick]


FAST_PEERS = ("kmeans_aw", "gptq", "gptq_g128", "squeeze")  # in the order fast_peers builds them


def fast_peers(
    model: nn.Module,
    data: PackedDataset,
    plan: PalettizeConfig,
    ppl: Callable[[nn.Module], float],
    out: Path,
    done: Callable[[str, dict[str, Any]], None] = lambda _name, _entry: None,
    skip: Collection[str] = (),
) -> dict[str, Any]:
    """GPTQ (per channel and g128, act-order), Fisher-weighted k-means (one LUT per row) and activation-aware
    k-means (one LUT per tensor, eDKM's warm start) of copies of ``model``.

    ``done(name, entry)`` is called after each with its entries (a caller records them: a stopped job resumes
    after the last finished peer); the peers named in ``skip`` are not built (finished before). Returns
    ``{kmeans_aw,gptq,gptq_g128,squeeze}_{ppl,size_bytes,bpw}`` of the peers built; bpw = stored bits per weight
    of the ``plan.bits`` layers (indices + scales / LUTs), read from the saved file.
    """
    calib = calibration(data)
    report: dict[str, Any] = {}
    makers = {
        "kmeans_aw": lambda m: ptq_kmeans_(m, plan, input_importance(m, calib)),
        "gptq": lambda m: gptq_(m, calib, plan),
        "gptq_g128": lambda m: gptq_(m, calib, plan, group_size=128),
        "squeeze": lambda m: squeeze_(m, calib, plan),
    }
    for name, make in makers.items():
        if name in skip:
            continue
        peer = make(copy.deepcopy(model))
        path = out / f"{name}.edkm.safetensors"
        save_palettized(peer, path)
        entry = {
            f"{name}_ppl": ppl(peer),
            f"{name}_size_bytes": path.stat().st_size,
            f"{name}_bpw": bits_per_weight(path)[str(plan.bits)],
        }
        report.update(entry)
        done(name, entry)
    return report

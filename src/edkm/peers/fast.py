"""The fast post-training peers of the main job (``edkm compress``): GPTQ and SqueezeLLM-style k-means."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edkm.config import PalettizeConfig
from edkm.data.text import PackedDataset
from edkm.export import save_palettized
from edkm.peers.gptq import gptq_
from edkm.peers.measure import bits_per_weight
from edkm.peers.squeeze import squeeze_


def calibration(data: PackedDataset, n: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` training sequences (seeded choice): the calibration set of every post-training peer."""
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return data.input_ids[pick]


def fast_peers(
    model: nn.Module, data: PackedDataset, plan: PalettizeConfig, ppl: Callable[[nn.Module], float], out: Path
) -> dict[str, Any]:
    """GPTQ (per channel, act-order) and Fisher-weighted k-means (one LUT per row) of copies of ``model``.

    Returns ``{gptq,squeeze}_{ppl,size_bytes,bpw}``; bpw = stored bits per weight of the ``plan.bits``
    layers (indices + scales / LUTs), read from the saved file.
    """
    calib = calibration(data)
    report: dict[str, Any] = {}
    for name, make in (("gptq", lambda m: gptq_(m, calib, plan)), ("squeeze", lambda m: squeeze_(m, calib, plan))):
        peer = make(copy.deepcopy(model))
        path = out / f"{name}.edkm.safetensors"
        save_palettized(peer, path)
        report.update(
            {
                f"{name}_ppl": ppl(peer),
                f"{name}_size_bytes": path.stat().st_size,
                f"{name}_bpw": bits_per_weight(path)[str(plan.bits)],
            }
        )
    return report

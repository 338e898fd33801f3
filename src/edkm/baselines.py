"""Post-training baselines users compare train-time clustering with.

* ``ptq_kmeans_``: 1-D k-means LUTs of the 16-bit weights, no fine-tuning.
* ``rtn_``: round-to-nearest uniform (asymmetric min-max) quantisation per output channel or per
  group of ``group_size`` consecutive input weights (the GPTQ/AWQ "g128" convention). Its levels are
  stored as a LUT (min + scale * j), so it exports and loads like any clustered model; on disk
  that costs 2^b fp16 entries per group where a scale + zero point would cost two.

Example:
    >>> import torch, edkm
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> _ = edkm.rtn_(model, edkm.PalettizeConfig(bits=2, memory="plain"))
    >>> model[0].lut.lut.shape   # one 4-level LUT per output channel
    torch.Size([4, 4])
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PalettizeConfig
from .wrap import LUT_DTYPE, LUTModule, LUTWeight, _set, _targets, finalize_, palettize_


def ptq_kmeans_(model: nn.Module, config: PalettizeConfig | None = None) -> nn.Module:
    """Post-training k-means palettization (the train-time path with zero training steps)."""
    return finalize_(palettize_(model, config))


def rtn_lut(weight: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform min-max levels per group: (uint8 indices (G, n), fp16 LUT (G, 2^bits))."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    if group_size is not None and rows.shape[1] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {rows.shape[1]} input channels of a {tuple(weight.shape)} weight")
    groups = rows.reshape(-1, group_size or rows.shape[1])
    lo, hi = groups.min(dim=1, keepdim=True).values, groups.max(dim=1, keepdim=True).values
    step = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-12)
    idx = torch.round((groups - lo) / step).clamp(0, (1 << bits) - 1)
    lut = lo + step * torch.arange(1 << bits, dtype=torch.float32)
    return idx.to(torch.uint8), lut.to(LUT_DTYPE)


@torch.no_grad()
def rtn_(model: nn.Module, config: PalettizeConfig | None = None, *, group_size: int | None = None) -> nn.Module:
    """Round-to-nearest baseline in place; bits and targets come from ``config``."""
    config = config or PalettizeConfig()
    luts: dict[int, LUTWeight] = {}
    for name, module in _targets(model, config):
        weight = module.weight
        if id(weight) not in luts:
            bits = config.for_module(name).bits
            idx, lut = rtn_lut(weight, bits, group_size)
            luts[id(weight)] = LUTWeight(lut, idx, weight.shape, bits, weight.dtype)
        _set(model, name, LUTModule(module, luts[id(weight)]))
    return model

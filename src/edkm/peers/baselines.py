"""Post-training baselines users compare train-time clustering with.

* ``ptq_kmeans_``: 1-D k-means LUTs of the 16-bit weights, no fine-tuning (activation-aware given the mean
  squared inputs of the layers).
* ``rtn_``: round-to-nearest uniform (asymmetric min-max) quantisation per output channel or per
  group of ``group_size`` consecutive input weights (the GPTQ/AWQ "g128" convention). It computes
  with a LUT of the levels min + scale * j like any clustered model; on disk it keeps only the
  min and the scale of each group (fp32).

Example:
    >>> import torch, edkm
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> _ = edkm.rtn_(model, edkm.PalettizeConfig(bits=2))
    >>> model[0].lut.lut.shape   # one 4-level LUT per output channel
    torch.Size([4, 4])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from edkm.config import PalettizeConfig
from edkm.layers.base import rows_first_weight, set_submodule
from edkm.layers.lut import LUTModule, LUTWeight
from edkm.transform import finalize_, palettize_, warm_start_, weight_plans


def ptq_kmeans_(
    model: nn.Module, config: PalettizeConfig | None = None, importance: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """Post-training k-means palettization (the train-time path with zero training steps); activation-aware
    with ``importance`` (:func:`edkm.peers.calibrate.input_importance`, see :func:`edkm.transform.warm_start_`)."""
    model = palettize_(model, config)
    return finalize_(warm_start_(model, importance) if importance is not None else model)


def rtn_uniform(
    weight: torch.Tensor, bits: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform min-max levels per group: uint8 indices (G, n), fp32 min and scale (G, 1) of the levels."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    if group_size is not None and rows.shape[1] % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the {rows.shape[1]} input channels "
            f"of a {tuple(weight.shape)} weight"
        )
    groups = rows.reshape(-1, group_size or rows.shape[1])
    lo, hi = groups.min(dim=1, keepdim=True).values, groups.max(dim=1, keepdim=True).values
    step = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-12)
    idx = torch.round((groups - lo) / step).clamp(0, (1 << bits) - 1)
    return idx.to(torch.uint8), lo, step


@torch.no_grad()
def rtn_(model: nn.Module, config: PalettizeConfig | None = None, *, group_size: int | None = None) -> nn.Module:
    """Round-to-nearest baseline in place; bits and targets come from ``config``."""
    config = config or PalettizeConfig()
    for modules, spec in weight_plans(model, config):  # tied weights: the most bits any of their names asks for
        weight = rows_first_weight(modules[0][1])
        idx, lo, step = rtn_uniform(weight, spec.bits, group_size)
        lut = LUTWeight.from_uniform(lo, step, idx, weight.shape, spec.bits, weight.dtype)
        for name, module in modules:
            set_submodule(model, name, LUTModule(module, lut))
    return model

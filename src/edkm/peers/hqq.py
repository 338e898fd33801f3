"""HQQ (Badri & Shaji, 2023) through the ``hqq`` library: calibration-free zero-point / scale optimisation.

``hqq.core.quantize.Quantizer.quantize`` (half-quadratic optimisation of the zero point under an
l_p<1 error, axis 1 = groups of consecutive input weights) runs on CPU; its integers, scales and
(fractional) zero points become our uniform LUT layers: level j = (j - zero) * scale.
"""

from __future__ import annotations

import torch
from torch import nn

from edkm.config import PalettizeConfig
from edkm.layers.lut import LUTWeight
from edkm.peers.calibrate import quantize_layers_
from edkm.peers.gptq import fit_group, rtn_lut


def hqq_lut(weight: torch.Tensor, bits: int, group_size: int | None) -> LUTWeight:
    """HQQ of one weight (``group_size`` input columns per scale; None = per output channel)."""
    # deferred: hqq is the peers extra, loaded only when HQQ runs
    from hqq.core.quantize import Quantizer

    rows, cols = weight.shape
    size = fit_group(cols, group_size) or cols
    w_q, meta = Quantizer.quantize(
        weight.detach().float(),
        nbits=bits,
        channel_wise=True,
        group_size=size,
        optimize=True,
        axis=1,
        bitpack=False,
        device="cpu",
        compute_dtype=torch.float32,
    )
    scale, zero = meta["scale"].float().reshape(-1, 1), meta["zero"].float().reshape(-1, 1)
    lo, step = (-zero * scale).half(), scale.half()
    idx = w_q.reshape(lo.shape[0], -1).round().clamp(0, (1 << bits) - 1).to(torch.uint8)
    return LUTWeight.from_uniform(lo, step, idx, weight.shape, bits, weight.dtype)


def hqq_(model: nn.Module, config: PalettizeConfig, group_size: int | None = 32) -> nn.Module:
    """HQQ every target linear layer in place; embeddings / layers above 4 bits get RTN per channel."""

    def make_lut(name: str, module: nn.Module, _stats: dict[str, torch.Tensor]) -> LUTWeight:
        bits = config.for_module(name).bits
        if not isinstance(module, nn.Linear) or bits > 4:
            return rtn_lut(module.weight, bits)
        return hqq_lut(module.weight, bits, group_size)

    return quantize_layers_(model, config, make_lut)

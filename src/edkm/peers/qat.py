"""Quantization-aware training through torchao (the peer a PyTorch user reaches for first).

:func:`prepare_qat_` swaps the decoder's linear layers for torchao ``FakeQuantizedLinear`` layers
(``QATConfig(IntxWeightOnlyConfig(int3/int4, PerGroup(g) or PerAxis(0)), step="prepare")``: weight-only,
symmetric, group-wise fake quantization with straight-through gradients); the model then trains
with our loop like eDKM. :func:`convert_qat_` applies torchao's own convert step (a real
``IntxUnpackedToInt8Tensor`` model, whose forward equals the fake-quantized one) and
:func:`qat_to_lut_` rewrites its integers and scales as our LUT layers (fp16 scale and zero point
per group) so that the export and size code measure it like every other row. The tied embedding /
output layer is not fake-quantized (torchao's QAT leaves it to the user) and is rounded to 8 bits
per channel at the end, as eDKM's 8-bit LUT holds it.
"""

from __future__ import annotations

import torch
from torch import nn

from edkm.config import PalettizeConfig
from edkm.layers.base import set_submodule
from edkm.layers.lut import LUTModule, LUTWeight
from edkm.peers.gptq import rtn_lut
from edkm.transform import target_modules


def _base_configs(bits: int, group_size: int | None) -> list[tuple[object, object]]:
    """(torchao base config, filter) pairs: groups where ``group_size`` divides the input width, else per channel."""
    # deferred: torchao is the peers extra, loaded only when QAT runs
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    dtype = getattr(torch, f"int{bits}")
    per_channel = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerAxis(0))
    if not group_size:
        return [(per_channel, lambda m: True)]
    grouped = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(group_size))
    fits = lambda m: m.in_features % group_size == 0 and m.in_features > group_size  # noqa: E731
    return [(grouped, fits), (per_channel, lambda m: not fits(m))]


def _decoder_linears(model: nn.Module, config: PalettizeConfig) -> set[str]:
    """Target Linear layers at <= 4 bits whose weight is not shared (the tied output layer is not)."""
    counts: dict[int, int] = {}
    found = target_modules(model, config)
    for _, m in found:
        counts[id(m.weight)] = counts.get(id(m.weight), 0) + 1
    return {
        n for n, m in found if type(m) is nn.Linear and counts[id(m.weight)] == 1 and config.for_module(n).bits <= 4
    }


def prepare_qat_(model: nn.Module, config: PalettizeConfig, group_size: int | None = 32) -> nn.Module:
    """Fake-quantize the decoder linears at ``config.bits`` (torchao ``QATConfig`` prepare step), in place."""
    # deferred: torchao is the peers extra, loaded only when QAT runs
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    names = _decoder_linears(model, config)
    if not names:
        raise ValueError("prepare_qat_ found no linear layer to fake-quantize")
    for base, fits in _base_configs(config.bits, group_size):
        quantize_(
            model,
            QATConfig(base, step="prepare"),
            filter_fn=lambda m, n, fits=fits: n in names and type(m) is nn.Linear and fits(m),
        )
    model.edkm_qat = (config, group_size)
    return model


def intx_ptq_(model: nn.Module, config: PalettizeConfig, group_size: int | None = 32) -> nn.Module:
    """torchao's post-training ``IntxWeightOnlyConfig`` (symmetric round-to-nearest per group) as LUT layers, in place.

    The uniform baseline QAT starts from: the same configs and layers as :func:`prepare_qat_`, no training.
    """
    # deferred: torchao is the peers extra, loaded only when this peer runs
    from torchao.quantization import quantize_

    names = _decoder_linears(model, config)
    for base, fits in _base_configs(config.bits, group_size):
        quantize_(model, base, filter_fn=lambda m, n, fits=fits: n in names and type(m) is nn.Linear and fits(m))
    model.edkm_qat = (config, group_size)
    return qat_to_lut_(model)


def convert_qat_(model: nn.Module) -> nn.Module:
    """torchao's convert step: fake-quantized layers become int weights with scales (same forward)."""
    # deferred: torchao is the peers extra, loaded only when QAT runs
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    config, group_size = model.edkm_qat
    for base, fits in _base_configs(config.bits, group_size):
        quantize_(
            model,
            QATConfig(base, step="convert"),
            filter_fn=lambda m, n, fits=fits: isinstance(m, FakeQuantizedLinear) and fits(m),
        )
    return model


@torch.no_grad()
def qat_to_lut_(model: nn.Module) -> nn.Module:
    """Rewrite a converted model as LUT layers (uniform levels, fp16 scale and zero point per group), in place.

    The remaining target layers (the tied embedding and output layer) get round-to-nearest per channel.
    """
    config, _ = model.edkm_qat
    converted = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and hasattr(m.weight, "qdata")]
    for name, module in converted:
        w = module.weight
        qmin = -(1 << (config.bits - 1))
        scale, zero = w.scale.float(), w.zero_point.float()  # (out, groups per row)
        lo = ((qmin - zero) * scale).reshape(-1, 1).half()
        step = scale.reshape(-1, 1).half()
        idx = (w.qdata.to(torch.int16) - qmin).to(torch.uint8).reshape(lo.shape[0], -1)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.bias = module.bias
        set_submodule(
            model, name, LUTModule(plain, LUTWeight.from_uniform(lo, step, idx, w.shape, config.bits, torch.float32))
        )
    done: dict[int, LUTWeight] = {}
    for name, module in target_modules(model, config):
        if isinstance(module, LUTModule):
            continue
        key = id(module.weight)
        done.setdefault(key, rtn_lut(module.weight, config.for_module(name).bits))
        set_submodule(model, name, LUTModule(module, done[key]))
    del model.edkm_qat
    return model

"""AWQ-style activation-aware scaling (Lin et al., 2024) in front of round-to-nearest, for Llama blocks.

Per scaling group (input norm -> q/k/v, post-attention norm -> gate/up, up -> down), input channel
c is scaled by s_c = mean|x_c|^alpha: the weights' columns are multiplied by s and the producer
(the RMSNorm weight, or up_proj's rows) divided by it, which leaves the fp model unchanged but
makes round-to-nearest spend its grid on the channels that carry large activations. alpha is
searched on a grid by the output error of the quantized group on calibration inputs (training
split), block after block on the model quantized so far. (v -> o is skipped: with grouped-query
attention their widths differ, as AutoAWQ skips it.) Clipping search is not done.
"""

from __future__ import annotations

import torch
from torch import nn

from edkm.config import PalettizeConfig
from edkm.layers.base import set_submodule
from edkm.layers.lut import LUTModule
from edkm.peers.calibrate import run_batches
from edkm.peers.gptq import rtn_lut
from edkm.transform import target_modules

GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def _inputs(model: nn.Module, modules: list[nn.Module], sequences: torch.Tensor) -> list[torch.Tensor]:
    """The inputs (N, in) each module sees on ``sequences``."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, args, i=i: seen[i].append(args[0].detach().float().reshape(-1, args[0].shape[-1]))
        )
        for i, m in enumerate(modules)
    ]
    try:
        run_batches(model.eval(), sequences)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in seen]


def best_scale(
    x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int | None, grid: int = 20
) -> torch.Tensor:
    """The s = mean|x|^alpha (alpha on ``grid`` + 1 points of [0, 1]) minimising sum ||x W^T - (x/s) Q(W s)^T||^2."""
    mean = x.abs().mean(0).clamp_min(1e-8)
    ref = [x @ w.float().T for w in weights]
    best, best_err = torch.ones_like(mean), float("inf")
    for alpha in torch.linspace(0, 1, grid + 1).tolist():
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # keep the scales centred around 1
        err = sum(
            float((r - (x / s) @ rtn_lut(w.float() * s, bits, group_size)().T).square().sum())
            for w, r in zip(weights, ref)
        )
        if err < best_err:
            best, best_err = s, err
    return best


@torch.no_grad()
def awq_(model: nn.Module, sequences: torch.Tensor, config: PalettizeConfig, group_size: int | None = 32) -> nn.Module:
    """AWQ scaling + round-to-nearest of every decoder linear of a Llama-style model, in place."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers[0], "input_layernorm"):
        raise ValueError("awq_ supports Llama-style models (model.model.layers[i].input_layernorm, self_attn, mlp)")
    bits = config.bits
    for block in layers:
        for producer, consumers in GROUPS:
            mods = [block.get_submodule(n) for n in consumers]
            (x,) = _inputs(model, mods[:1], sequences)
            s = best_scale(x, [m.weight for m in mods], bits, group_size)
            prod = block.get_submodule(producer)
            if isinstance(prod, nn.Linear):
                prod.weight.div_(s.unsqueeze(1))
            else:
                prod.weight.div_(s)
            for m in mods:
                m.weight.mul_(s)
        for name, m in list(block.named_modules()):
            if type(m) is nn.Linear:
                set_submodule(block, name, LUTModule(m, rtn_lut(m.weight, bits, group_size)))
    done: dict[int, object] = {}
    for name, module in target_modules(model, config):  # what is left: the (tied) embedding and output layer
        lut = done.setdefault(id(module.weight), rtn_lut(module.weight, config.for_module(name).bits))
        set_submodule(model, name, LUTModule(module, lut))
    return model

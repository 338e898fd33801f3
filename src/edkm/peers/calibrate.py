"""Calibration statistics for post-training peers, from training-split sequences.

* :func:`input_hessians`: H = 2/N sum x x^T of the inputs of chosen linear layers (GPTQ);
* :func:`input_importance`: the mean squared input of each column of chosen linear layers (activation-aware
  k-means: the warm start of eDKM on a real LLM);
* :func:`fisher_diagonal`: sum of squared gradients of the next-token loss per weight (SqueezeLLM);
  :func:`fisher_importance` names it per linear layer, :func:`warm_start_importance` picks eDKM's warm-start
  weights (activation-aware or Fisher-weighted k-means);
* :func:`quantize_layers_`: swap layers for LUT layers block by block, so that each block is
  calibrated on the outputs of the blocks already quantized (GPTQ's sequential order);
* :class:`BlockInputs`: that order at O(layers) cost, as the reference GPTQ does it: the inputs of the next
  decoder block are cached, so each block runs twice on them (for its statistics, then quantized, to give the next
  block's inputs) instead of the whole model running once per block (O(layers^2)). The same tensors flow as in a
  whole-model forward, so the statistics are the same, bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edkm.config import PalettizeConfig
from edkm.layers.base import set_submodule
from edkm.layers.lut import LUTModule, LUTWeight
from edkm.transform import target_modules

BLOCK = re.compile(r"(.*\blayers\.\d+)\.")


def run_batches(model: nn.Module, sequences: torch.Tensor, batch_size: int = 8) -> None:
    """Forward ``sequences`` (B, T) through ``model`` without gradients."""
    with torch.no_grad():
        for chunk in sequences.split(batch_size):
            model(chunk)


def _collect(
    model: nn.Module, names: list[str], run: Callable[[], object], stat: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Mean of ``stat`` over the input rows of each named layer while ``run()`` feeds the model."""
    sums: dict[str, torch.Tensor] = {}
    count = {"n": 0}

    def hook(name: str):
        def fn(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + stat(x)
            if name == names[0]:
                count["n"] += x.shape[0]

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {n: s / count["n"] for n, s in sums.items()}


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x.double().T @ x.double()


def input_hessians(model: nn.Module, names: list[str], sequences: torch.Tensor) -> dict[str, torch.Tensor]:
    """GPTQ's H = 2 X^T X / N (fp64) for each named linear layer, from one pass over ``sequences``."""
    run = lambda: run_batches(model.eval(), sequences)  # noqa: E731
    return {n: 2 * h for n, h in _collect(model, names, run, _gram).items()}


def input_importance(
    model: nn.Module, sequences: torch.Tensor, names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Mean squared input of each column, shape (1, in), of the named linear layers (default: every
    ``nn.Linear``), from one pass over ``sequences``: the weights of activation-aware k-means
    (:func:`edkm.transform.warm_start_`).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 2))
    >>> input_importance(model, torch.arange(8).reshape(2, 4))["1"].shape
    torch.Size([1, 4])
    """
    names = names or [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    run = lambda: run_batches(model.eval(), sequences)  # noqa: E731
    stats = _collect(model, names, run, lambda x: x.double().square().sum(0))
    return {n: s.float().unsqueeze(0) for n, s in stats.items()}


def fisher_diagonal(model: nn.Module, sequences: torch.Tensor, batch_size: int = 4) -> dict[int, torch.Tensor]:
    """Sum over sequences of squared gradients of the mean next-token loss, keyed by ``id(parameter)``.

    Gradients are taken per mini-batch of ``batch_size`` sequences (SqueezeLLM's empirical Fisher).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fisher = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    model.eval()
    for chunk in sequences.split(batch_size):
        model.zero_grad(set_to_none=True)
        logits = model(chunk[:, :-1]).logits.float()
        F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()).backward()
        for p in params:
            if p.grad is not None:
                fisher[id(p)] += p.grad.float().square()
    model.zero_grad(set_to_none=True)
    return fisher


def block_of(name: str) -> str:
    """The decoder block a module belongs to (``model.layers.3``), or the name itself outside blocks."""
    m = BLOCK.match(name)
    return m.group(1) if m else name


def quantize_layers_(
    model: nn.Module,
    config: PalettizeConfig,
    make_lut: Callable[[str, nn.Module, dict[str, torch.Tensor]], LUTWeight],
    stats: Callable[[nn.Module, list[str]], dict[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """Replace every target layer by a LUT layer, one decoder block at a time.

    ``stats(model, names)`` computes the calibration statistic of a block's layers on the model as
    quantized so far; ``make_lut(name, module, stats)`` returns the layer's LUTWeight. A tied weight
    is quantized once (at its first module name).
    """
    blocks: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in target_modules(model, config):
        blocks.setdefault(block_of(name), []).append((name, module))
    done: dict[int, LUTWeight] = {}
    for members in blocks.values():
        fresh = [n for n, m in members if id(m.weight) not in done and isinstance(m, nn.Linear)]
        block_stats = stats(model, fresh) if stats is not None and fresh else {}
        for name, module in members:
            key = id(module.weight)
            if key not in done:
                done[key] = make_lut(name, module, block_stats)
            set_submodule(model, name, LUTModule(module, done[key]))
    return model


class _Captured(Exception):
    """Raised by the hook that caught a block's inputs: the rest of the forward is not needed."""


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A decoder layer's keyword arguments with its key/value cache dropped (a replayed layer must not append to the
    cache of the forward it was caught in; transformers names it ``cache`` or ``past_key_values`` by version).

    >>> class DynamicCache: ...
    >>> without_cache({"cache": DynamicCache(), "use_cache": True, "position_ids": 1})
    {'cache': None, 'use_cache': False, 'position_ids': 1}
    """
    out = {k: None if type(v).__name__.endswith("Cache") else v for k, v in kwargs.items()}
    return {**out, "use_cache": False} if "use_cache" in out else out


class BlockInputs:
    """GPTQ's calibration statistics block by block on cached inputs (O(layers) block forwards in all).

    ``hessians(model, names)`` has :func:`input_hessians`' contract, called by :func:`quantize_layers_` for one
    decoder block after another (``model.layers.<i>``); names outside decoder blocks take a whole-model pass.
    """

    def __init__(self, sequences: torch.Tensor, batch_size: int = 8) -> None:
        self.sequences, self.batch_size = sequences, batch_size
        self.block: str | None = None  # the block whose inputs are cached
        self.inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []  # (args, kwargs) per batch

    def hessians(self, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        block = block_of(names[0])
        if block == names[0] or any(block_of(n) != block for n in names):  # not a decoder block: a whole pass
            return input_hessians(model, names, self.sequences)
        self._advance(model, block)
        run = lambda: self._run(model.get_submodule(block))  # noqa: E731
        return {n: 2 * h for n, h in _collect(model, names, run, _gram).items()}

    def _advance(self, model: nn.Module, block: str) -> None:
        """Cache the inputs of ``block``: captured from the model for the first block, else the outputs of the
        cached block (quantized by now) run on its own cached inputs."""
        if self.block is None:
            self.inputs = self._capture(model, block)
        elif self.block != block:
            outputs = self._run(model.get_submodule(self.block))
            self.inputs = [((out, *args[1:]), kwargs) for out, (args, kwargs) in zip(outputs, self.inputs)]
        self.block = block

    def _capture(self, model: nn.Module, block: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        captured = []

        def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.append((args, without_cache(kwargs)))
            raise _Captured

        handle = model.get_submodule(block).register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for chunk in self.sequences.split(self.batch_size):
                    try:
                        model.eval()(chunk)
                    except _Captured:
                        pass
        finally:
            handle.remove()
        return captured

    def _run(self, module: nn.Module) -> list[torch.Tensor]:
        """``module`` on every cached batch; its hidden-state outputs."""
        outs = []
        with torch.no_grad():
            for args, kwargs in self.inputs:
                out = module(*args, **kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs


def fisher_importance(model: nn.Module, sequences: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The Fisher diagonal (:func:`fisher_diagonal`) of each named linear layer's weight, shape (out, in): the
    weights of Fisher-weighted (SqueezeLLM's "sensitive") k-means, :func:`edkm.transform.warm_start_`'s input.

    >>> import torch, transformers
    >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                                   num_attention_heads=2)
    >>> model = transformers.LlamaForCausalLM(config)
    >>> name = "model.layers.0.mlp.up_proj"
    >>> fisher_importance(model, torch.randint(0, 32, (2, 9)), [name])[name].shape
    torch.Size([16, 8])
    """
    fisher = fisher_diagonal(model, sequences)
    return {n: fisher[id(model.get_submodule(n).weight)] for n in names}


def warm_start_importance(
    model: nn.Module, sequences: torch.Tensor, warm_start: str, plan: PalettizeConfig
) -> dict[str, torch.Tensor] | None:
    """What weighs each weight's error in eDKM's first k-means (:func:`edkm.transform.warm_start_`), from the
    calibration ``sequences``; None for ``"kmeans"`` (plain k-means).

    ``"activation"``: each linear layer's mean squared input per column (:func:`input_importance`); ``"fisher"``:
    the Fisher diagonal per weight (:func:`fisher_importance`, SqueezeLLM's sensitivity) for the layers at <= 4 bits
    of ``plan`` and the activation weights for the rest (the 8-bit embedding / head, whose Fisher is zero on the
    rows of tokens the calibration text never shows).
    """
    if warm_start == "kmeans":
        return None
    importance = input_importance(model, sequences)
    if warm_start == "fisher":
        low = [n for n in importance if plan.for_module(n).bits <= 4]
        importance.update(fisher_importance(model, sequences, low))
    return importance

"""Greedy generation through the lean forward, and ``model.generate`` routed to it for packed models.

:func:`lean_generate` is batch-1 greedy decoding with :class:`~edkm.generation.llama.LeanLlama`: the same tokens as
transformers' greedy ``generate`` (the same logits up to fp32 rounding), several times fewer calls per token.

:class:`LeanGenerate` is what ``from_pretrained`` of an edkm folder (and ``edkm.load_palettized``) binds as the
model's ``generate`` for Llama-architecture CPU models, the way transformers binds a repository's
``custom_generate``: a call it can answer exactly (one sequence, greedy, no logits processor) runs the lean path;
anything else (sampling, beams, streamers, processors, batches) runs transformers' own ``generate`` unchanged.
Its lean model (fused packed weights) is built on first use and rebuilt when a LUT buffer changes.

Example:
    >>> import torch, edkm
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    ...                   num_key_value_heads=2, vocab_size=96, eos_token_id=None, bos_token_id=None)
    >>> model = edkm.rtn_(LlamaForCausalLM(cfg).eval(), edkm.PalettizeConfig(bits=4))
    >>> ids = torch.tensor([[1, 5, 7]])
    >>> ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    >>> torch.equal(lean_generate(model, ids, 6), ref)
    True
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from edkm.generation.llama import LeanLlama, unsupported_reason
from edkm.kernels.linear import version
from edkm.layers.lut import LUTWeight

# generation settings that change which token greedy decoding picks: the lean path runs only at their defaults
_PROCESSING = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "min_length",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "guidance_scale",
    "watermarking_config",
    "stop_strings",
    "max_time",
    "output_scores",
    "output_logits",
    "output_attentions",
    "output_hidden_states",
    "return_dict_in_generate",
    "renormalize_logits",
    "epsilon_cutoff",
    "eta_cutoff",
    "exponential_decay_length_penalty",
    "token_healing",
    "prompt_lookup_num_tokens",
    "assistant_early_exit",
)
_ONE_IS_NEUTRAL = ("repetition_penalty", "encoder_repetition_penalty", "guidance_scale")
_PLAIN_ARGS = {"attention_mask", "use_cache", "pad_token_id", "generation_config"}


def neutral(name: str, value: Any) -> bool:
    """Whether a generation setting leaves greedy decoding's choice alone (None, off, zero, or a factor of 1)."""
    if value is None or (not isinstance(value, (list, dict, tuple)) and value in (False, 0)):
        return True
    return name in _ONE_IS_NEUTRAL and value == 1.0


def eos_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}


@torch.no_grad()
def lean_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    min_new_tokens: int = 0,
    lean: LeanLlama | None = None,
) -> torch.Tensor:
    """Greedy continuation of one sequence ``input_ids (1, T)``: ``(1, T + new)``, stopping after an EOS token."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"lean generation takes one sequence (1, T), got {tuple(input_ids.shape)}")
    total = input_ids.shape[1] + max_new_tokens
    if lean is None or lean.max_tokens < total:
        lean = LeanLlama(model, total)
    lean.reset()
    stops, out = eos_ids(eos_token_id), [input_ids[0]]
    logits = lean.forward(input_ids[0])
    for i in range(max_new_tokens):
        if i < min_new_tokens:
            logits[list(stops)] = float("-inf")
        token = logits.argmax().reshape(1)
        out.append(token)
        if int(token) in stops or i == max_new_tokens - 1:
            break
        logits = lean.forward(token)
    return torch.cat(out)[None]


def lut_key(model: nn.Module) -> tuple:
    """What the lean model was built from: every LUT buffer's storage and version (indices: uint8 or packed)."""
    return tuple(
        (t.data_ptr(), version(t))
        for m in model.modules()
        if isinstance(m, LUTWeight)
        for t in m.buffers(recurse=False)
        if t is not None
    )


class LeanGenerate:
    """``model.generate`` for a packed Llama model: the lean path where it is exact, else transformers' own."""

    def __init__(self, model: nn.Module) -> None:
        self.model_ref = [model]  # a list: not registered as a submodule if assigned to a module
        self.lean: LeanLlama | None = None
        self.key: tuple = ()

    def request(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, int, set[int], int] | None:
        """(input_ids, max_new_tokens, eos ids, min_new_tokens) when the lean path answers this call exactly."""
        model = self.model_ref[0]
        ids = args[0] if args else kwargs.get("input_ids")
        if len(args) > 1 or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or model.training:
            return None
        rest = {k: v for k, v in kwargs.items() if k != "input_ids"}
        mask = rest.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            return None
        config = copy.deepcopy(rest.pop("generation_config", None) or model.generation_config)
        unused = config.update(**{k: v for k, v in rest.items() if k not in _PLAIN_ARGS})
        if any(v is not None for v in unused.values()):  # streamer, logits_processor, stopping_criteria, ...
            return None
        if config.do_sample or (config.num_beams or 1) != 1 or (config.num_return_sequences or 1) != 1:
            return None
        if not all(neutral(k, getattr(config, k, None)) for k in _PROCESSING):
            return None
        if config.max_new_tokens is not None:
            new = int(config.max_new_tokens)
        else:
            new = int(config.max_length) - ids.shape[1]
        if new < 1:
            return None
        eos = rest.get("eos_token_id", config.eos_token_id)
        return ids, new, eos_ids(eos), int(config.min_new_tokens or 0)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model_ref[0]
        call = self.request(args, kwargs) if unsupported_reason(model) is None else None
        if call is None:
            return type(model).generate(model, *args, **kwargs)
        ids, new, eos, min_new = call
        key = lut_key(model)
        if self.lean is None or key != self.key or self.lean.max_tokens < ids.shape[1] + new:
            self.lean = None  # free the old cache first
            self.lean, self.key = LeanLlama(model, max(ids.shape[1] + new, 256)), key
        return lean_generate(model, ids, new, sorted(eos), min_new, self.lean)


def bind(model: nn.Module) -> nn.Module:
    """Route ``model.generate`` to :class:`LeanGenerate` when the lean path supports the model; returns ``model``."""
    if unsupported_reason(model) is None:
        model.generate = LeanGenerate(model)
    return model

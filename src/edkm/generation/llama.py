"""A lean batch-1 forward of a Llama-architecture model for generation: our own loop over the layers.

Why: a decode step through transformers' modules is ~300 module calls plus cache and mask bookkeeping; at batch
1 on a CPU that Python and dispatch time is as large as reading the weights (SmolLM2-135M packed at 3 bits:
~9 of ~18 ms per token). :class:`LeanLlama` keeps references to the model's own tensors, fuses q/k/v and
gate/up into one packed kernel call each (:mod:`.weights`), keeps a preallocated KV cache and the rotary
tables of every position, and makes ~15 tensor calls per layer. It computes what ``LlamaForCausalLM`` computes
(the same weights, the same formulas; logits equal within fp32 rounding, tested) for one sequence.

Example:
    >>> import torch, edkm
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    ...                   num_key_value_heads=2, vocab_size=96)
    >>> model = edkm.rtn_(LlamaForCausalLM(cfg).eval(), edkm.PalettizeConfig(bits=4))
    >>> lean = LeanLlama(model, max_tokens=16)
    >>> ids = torch.tensor([[1, 5, 7, 9]])
    >>> with torch.no_grad():
    ...     ref = model(ids).logits[0]
    ...     ours = lean.forward(ids[0])
    >>> bool(torch.allclose(ours, ref[-1], atol=1e-5)), lean.position
    (True, 4)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from edkm.generation.weights import Projection
from edkm.kernels import native

MODEL_TYPES = ("llama",)
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")  # fixed per position: tables can be precomputed


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`LeanLlama` cannot run ``model`` (one line), or None when it can."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', type(model).__name__)!r} (the lean path runs {MODEL_TYPES})"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in ROPE_TYPES:
        return f"rope type {rope!r} changes with the sequence length"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    device = next(model.parameters(), torch.empty(0)).device
    if device.type != "cpu":
        return f"the model is on {device.type} (the lean path is for CPU)"
    return None


class Layer(NamedTuple):
    """One decoder layer's tensors and projections."""

    input_norm: torch.Tensor
    qkv: Projection
    o: Projection
    post_norm: torch.Tensor
    gate_up: Projection
    down: Projection


class LeanLlama:
    """Batch-1 forward of a ``LlamaForCausalLM`` over its own weights, with a KV cache of ``max_tokens`` positions.

    :meth:`forward` appends tokens at :attr:`position` and returns the last token's logits (fp32);
    :meth:`reset` empties the cache. Holds no copy of a weight (fused projections hold the packed bytes).
    """

    def __init__(self, model: nn.Module, max_tokens: int) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"edkm's lean generation cannot run this model: {reason}")
        config, core = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = float(config.rms_norm_eps)
        self.embed = core.embed_tokens
        self.layers = [self.layer_of(block) for block in core.layers]
        self.norm = core.norm.weight.detach()
        self.head = Projection.of([model.lm_head])
        self.max_tokens = int(max_tokens)
        with torch.no_grad():
            positions = torch.arange(self.max_tokens)[None]
            cos, sin = core.rotary_emb(self.norm.float()[None, None], positions)
        half = self.head_dim // 2
        sin = sin[0].float()
        # (max_tokens, 1, head_dim); rotate_half(x) = cat(-x2, x1), so the first half of sin changes sign
        self.cos, self.signed_sin = cos[0].float()[:, None], torch.cat((-sin[:, :half], sin[:, half:]), -1)[:, None]
        shape = (len(self.layers), self.kv_heads, self.max_tokens, self.head_dim)
        self.keys, self.values = torch.zeros(shape), torch.zeros(shape)
        self.position = 0
        self.step = self.native_step()

    def native_step(self) -> Any:
        """The C++ decode step over the same tensors (``LlamaStep``), or None if a projection is not one packed
        weight (dense layers, unfusable parts) or a norm is not fp32."""
        projections = self.projections()
        norms = [t for layer in self.layers for t in (layer.input_norm, layer.post_norm)] + [self.norm]
        if not all(p.fused for p in projections) or any(n.dtype != torch.float32 for n in norms):
            return None
        parts = [p.parts[0] for p in projections]
        tensors = [
            [w.packed, w.table, torch.empty(0) if b is None else b] for w, b in ((q.packed, q.bias) for q in parts)
        ]
        shapes = [[w.bits, w.rows, w.cols, w.R, w.C] for w in (q.packed for q in parts)]
        return native.ext().LlamaStep(
            tensors, shapes, norms, self.keys, self.values, self.cos[:, 0], self.signed_sin[:, 0], self.heads, self.eps
        )

    @staticmethod
    def layer_of(block: nn.Module) -> Layer:
        attn, mlp = block.self_attn, block.mlp
        return Layer(
            block.input_layernorm.weight.detach(),
            Projection.of([attn.q_proj, attn.k_proj, attn.v_proj]),
            Projection.of([attn.o_proj]),
            block.post_attention_layernorm.weight.detach(),
            Projection.of([mlp.gate_proj, mlp.up_proj]),
            Projection.of([mlp.down_proj]),
        )

    def reset(self) -> None:
        """Forget the cached tokens (the next :meth:`forward` starts a new sequence)."""
        self.position = 0

    def projections(self) -> list[Projection]:
        return [p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.head]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' ``LlamaRMSNorm`` in fp32 (``F.rms_norm`` sums differently: 5x the logits' error)."""
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of ``x (T, heads, head_dim)``: transformers' ``x * cos + rotate_half(x) * sin``,
        with the sign of ``rotate_half`` kept in ``sin`` (:attr:`signed_sin`)."""
        half = self.head_dim // 2
        return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (fp32, (vocab,)) after the tokens ``ids`` (1-D), which are appended to the cache."""
        T, start = ids.numel(), self.position
        end = start + T
        if end > self.max_tokens:
            raise ValueError(f"the sequence would reach {end} tokens; this lean model caches {self.max_tokens}")
        x = self.embed(ids.reshape(1, T))[0].float()
        if T == 1 and self.step is not None:
            logits = self.step.step(x[0], start)
            self.position = end
            return logits
        cos, sin = self.cos[start:end], self.signed_sin[start:end]
        heads, kv, d = self.heads, self.kv_heads, self.head_dim
        q_rows = heads * d
        for i, layer in enumerate(self.layers):
            h = layer.qkv(self.rms_norm(x, layer.input_norm))
            qk = self.rotate(h[:, : q_rows + kv * d].view(T, heads + kv, d), cos, sin).transpose(0, 1)
            self.keys[i, :, start:end] = qk[heads:]
            self.values[i, :, start:end] = h[:, q_rows + kv * d :].view(T, kv, d).transpose(0, 1)
            a = F.scaled_dot_product_attention(
                qk[None, :heads],
                self.keys[i, :, :end][None],
                self.values[i, :, :end][None],
                is_causal=start == 0 and T > 1,
                attn_mask=None if start == 0 or T == 1 else self.mask(start, end),
                enable_gqa=self.heads != self.kv_heads,
            )
            x = x + layer.o(a[0].transpose(0, 1).reshape(T, q_rows))
            g = layer.gate_up(self.rms_norm(x, layer.post_norm))
            half = g.shape[-1] // 2
            x = x + layer.down(F.silu(g[:, :half]) * g[:, half:])
        self.position = end
        return self.head(self.rms_norm(x[-1:], self.norm))[0]

    @staticmethod
    def mask(start: int, end: int) -> torch.Tensor:
        """Causal mask of new positions ``start..end`` over cached ``0..end`` (True: attend)."""
        return torch.arange(end)[None] <= torch.arange(start, end)[:, None]

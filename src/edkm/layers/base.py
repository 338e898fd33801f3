"""The plumbing every clustered layer shares (DKM layers for training, LUT layers for inference).

Which modules edkm can cluster (:func:`layer_kind`: Linear, Embedding, transformers' Conv1D), their weight
layout (:func:`is_transposed`, :func:`rows_first_weight`) and :class:`WrappedLayer`, which keeps the wrapped
module's attributes and runs its own ``forward`` where it has one.

Example:
    >>> import torch
    >>> layer_kind(torch.nn.Linear(2, 3)), rows_first_weight(torch.nn.Linear(2, 3)).shape
    ('Linear', torch.Size([3, 2]))
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn


def conv1d_type() -> type | None:
    """transformers' GPT-2-style ``Conv1D`` (a linear layer with its weight stored (in, out)), once transformers is
    loaded."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def layer_kind(module: nn.Module) -> str | None:
    """The kind of layer edkm can cluster: ``'Linear'`` (``nn.Linear``, its subclasses, transformers' ``Conv1D``),
    ``'Embedding'`` (``nn.Embedding`` and subclasses), or None: anything else, an already wrapped layer, or a
    subclass holding child modules (its own forward could not run on a wrapped copy; it stays unclustered and
    :func:`edkm.transform.unclustered_weights` lists it).

    >>> layer_kind(nn.Linear(2, 3)), layer_kind(nn.Embedding(4, 2)), layer_kind(nn.LayerNorm(2))
    ('Linear', 'Embedding', None)
    """
    if next(module.children(), None) is not None:
        return None
    if isinstance(module, nn.Linear) or (conv1d_type() is not None and isinstance(module, conv1d_type())):
        return "Linear"
    return "Embedding" if isinstance(module, nn.Embedding) else None


def is_transposed(module: nn.Module) -> bool:
    """True when ``module`` stores its weight (in_features, out_features), like ``Conv1D``."""
    if isinstance(module, WrappedLayer):
        return module.transposed
    conv = conv1d_type()
    return conv is not None and isinstance(module, conv)


def rows_first_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear / Embedding / Conv1D layer with output channels (LUT groups) along dim 0."""
    return module.weight.t() if is_transposed(module) else module.weight


def own_forward_shell(module: nn.Module) -> nn.Module | None:
    """An empty instance of ``module``'s class (no tensors) to run its own ``forward``, or None when it has the plain
    ``nn.Linear`` / ``nn.Embedding`` forward (OPT's positional and Gemma's scaled embeddings, ``Conv1D`` have their
    own)."""
    if type(module).forward in (nn.Linear.forward, nn.Embedding.forward):
        return None
    shell = type(module).__new__(type(module))
    nn.Module.__init__(shell)
    shell.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"})
    return shell


class WrappedLayer(nn.Module):
    """Shared plumbing of DKM and LUT layers: keeps the wrapped module's attributes (weight, bias, padding_idx, ...)
    and buffers, its kind (``base_type``), weight layout (``transposed``) and, for a class with its own ``forward``,
    that forward (run on a tensor-less shell of the class with this layer's tensors and the clustered weight)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        for key, value in vars(base).items():
            if not key.startswith("_") and key not in ("training", "shell"):
                setattr(self, key, value)
        for key, param in base._parameters.items():
            self.register_parameter(key, param)  # the same Parameter objects (bias may be None)
        for key, buffer in base._buffers.items():  # e.g. Gemma's embed_scale
            self.register_buffer(key, buffer, persistent=key not in base._non_persistent_buffers_set)
        wrapped = isinstance(base, WrappedLayer)
        kind = base.base_type if wrapped else layer_kind(base)
        if kind is None:
            raise ValueError(f"cannot cluster a {type(base).__name__}: only Linear, Embedding and Conv1D layers")
        self.base_type: str = kind
        self.transposed: bool = is_transposed(base)
        self.__dict__["shell"] = base.shell if wrapped else own_forward_shell(base)  # not a submodule: holds no tensors

    def rows_first(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` in output-channels-first layout from the stored layout (and back: a transpose is its own
        inverse)."""
        return weight.t() if self.transposed else weight

    def _compute(self, x: torch.Tensor, weight: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """The layer's output for ``x`` computed with ``weight`` (output channels first)."""
        if self.shell is not None:  # the class's own forward, on the shell lent this layer's tensors for the call
            shell = self.shell
            tensors = {k: v for k, v in {**self._parameters, **self._buffers}.items() if v is not None}
            tensors["weight"] = self.rows_first(weight)
            shell.__dict__.update(
                tensors, training=self.training
            )  # plain attributes: found before nn.Module's registries
            try:
                return shell(x, *args, **kwargs)
            finally:
                for key in tensors:
                    del shell.__dict__[key]
        if self.base_type == "Linear":
            return F.linear(x, weight, self.bias)
        return F.embedding(
            x, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``model`` by ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
